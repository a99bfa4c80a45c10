// Claims taken ahead. An inactive thin id whose claim writes nothing but its own ledger row (no
// device, no mount, not a layer the claim must let go of) has one step after its claim: the pool
// `delete`. Such claims are made a few at a time, in one durable transaction, instead of one
// fsync'd transaction per delete. What still holds for each id: its intent (`deleting`) is on disk
// before its delete is sent, and the compare-and-set is made from fresh rows inside that
// transaction. What it costs: the claim is up to CLAIM_AHEAD − 1 deletes older when its delete is
// sent (GC holds the state dir exclusively, so nothing but a `--ignore-lock` run's neighbours can
// change the rows meanwhile, and they yield to `deleting`, ADR-0002 §3). A claim taken ahead whose
// delete is never sent (the run stopped) is undone; after a crash it is left `deleting`, and the
// next run deletes the id or confirms it gone, as after a timed-out delete.
import type { GcLedger } from "./act.ts";
import type { Orphan } from "./model.ts";

/** Bare deletes claimed in one transaction (the window above is at most this many deletes). */
export const CLAIM_AHEAD = 8;

/** The claim writes only the id's ledger row, and the pool `delete` is the one step after it. */
export function bareDelete(a: Orphan): boolean {
  return (
    a.device === null && a.unmount.length === 0 && a.deleteThin && a.thinId !== null && a.reason !== "unreferenced_layer" && a.reason !== "interrupted_build"
  );
}

/** The orphans to claim together with actions[i]: the run of bare deletes starting there, at most `max`. */
export function claimRun(actions: readonly Orphan[], i: number, max = CLAIM_AHEAD): Orphan[] {
  const out: Orphan[] = [];
  for (let k = i; k < actions.length && out.length < max && bareDelete(actions[k]!); k++) out.push(actions[k]!);
  return out;
}

/** The claims of one act() run: made ahead where claimRun allows (and the ledger can), else one by one. */
export class Claims {
  private readonly index = new Map<Orphan, number>();
  /** Verdicts of claims made ahead, not yet used (null: claimed). */
  private readonly ahead = new Map<Orphan, string | null>();
  constructor(
    private readonly actions: readonly Orphan[],
    private readonly ledger: GcLedger,
    private readonly max = CLAIM_AHEAD,
  ) {
    for (const [i, a] of actions.entries()) this.index.set(a, i);
  }

  /** The claim of `a`: null to go ahead, else why not. */
  claim(a: Orphan): string | null {
    if (this.ahead.has(a)) {
      const v = this.ahead.get(a)!;
      this.ahead.delete(a);
      return v;
    }
    const i = this.index.get(a);
    const run = this.ledger.claimMany && i !== undefined ? claimRun(this.actions, i, this.max) : [];
    if (run.length < 2 || !this.ledger.claimMany) return this.ledger.claim(a);
    const verdicts = this.ledger.claimMany(run);
    for (const [k, o] of run.entries()) this.ahead.set(o, verdicts[k] ?? null);
    return this.claim(a);
  }

  /** `a` will not run: a claim made ahead for it is undone. */
  drop(a: Orphan, why: string): void {
    if (!this.ahead.has(a)) return;
    const claimed = this.ahead.get(a) === null;
    this.ahead.delete(a);
    if (claimed && a.thinId !== null) this.ledger.thinDeleteAborted(a.thinId, why);
  }
}
