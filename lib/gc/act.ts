// Carry out a plan, one orphan at a time, each step bounded. Per orphan:
//   claim   the DB rows are still what the plan saw (compare-and-set; a thin id to delete is marked
//           `deleting` in the same transaction) — an unpack re-run that picked it up wins; the
//           claims of bare deletes are made a few at a time, in one transaction (claim-ahead.ts)
//   check   the device: same major:minor, same table (this pool, this thin id), not suspended, open
//           at most by our own mount
//   umount  our own mount — only if mountinfo at that path still shows the planned device
//   check   open count 0 now
//   remove  `dmsetup remove` (never --force)
//   delete  pool `delete N`
// "Gone already" is success ("No data available" for a delete); "busy" leaves the orphan for the next
// run; a timeout means the host is not healthy, so the run stops; so does a pool that disappeared.
// Before every orphan the pool must still be rw (and not needs_check): the moment it is not, nothing
// more is touched. The ledger says `deleting` before anything is done and `deleted` only after the
// pool confirmed it, so a thin id is never handed out again until the pool has really let go of it.
import { syncJournal } from "../cmd-journal.ts";
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { type MountEntry, mountinfo, umount } from "../dm/mount.ts";
import { deleteThin, parseThinTable, poolStatus } from "../dm/pool.ts";
import { errorMessage } from "../errors.ts";
import { CommandError } from "../exec.ts";
import { queueWanted, withHostQueue } from "../lock/host-queue.ts";
import { log } from "../log.ts";
import { Claims, claimRun } from "./claim-ahead.ts";
import type { DmDevice, Orphan } from "./model.ts";

export const STEP_TIMEOUT_MS = 10_000;

export type StepOutcome = "ok" | "already_gone" | "busy" | "changed" | "failed" | "timeout" | "pool_gone";

export interface StepResult {
  op: "claim" | "umount" | "check" | "remove" | "delete";
  target: string;
  outcome: StepOutcome;
  durationMs: number;
  error: string | null;
}

export type ActionOutcome = "done" | "skipped" | "failed" | "not_run";

export interface ActionResult {
  action: Orphan;
  outcome: ActionOutcome;
  steps: StepResult[];
  /** Why it was skipped at act time (busy, state changed since the scan). */
  skipReason: string | null;
}

export interface ActResult {
  results: ActionResult[];
  /** The run stopped early: the pool left rw mode, a step timed out, or we were asked to stop. */
  stopped: { reason: "pool_not_rw" | "pool_unreadable" | "pool_gone" | "timeout" | "aborted"; detail: string } | null;
  /**
   * Kernel names (`dm-N`) of devices this run unmounted and then removed. Unmounting a filesystem
   * that hit errors before (the reason its layer failed) logs ext4 errors for it; those are ours.
   */
  unmountedRemoved: string[];
}

/** What GC writes to the DB while acting (store-backed in run.ts; no-op in tests of the dm side). */
export interface GcLedger {
  /**
   * Before the first step of an orphan, in one transaction: the DB rows are still what the plan saw
   * (compare-and-set) and no live process holds a lock that may resume it; a thin id to delete is
   * then marked `deleting` (the intent). Returns null to go ahead, else why not (the orphan is skipped).
   */
  claim(a: Orphan): string | null;
  /** Several claims in one transaction (claim-ahead.ts: bare deletes only), each as claim() would. */
  claimMany?(as: Orphan[]): (string | null)[];
  /** The claim's `deleting` intent is durable (fsync'd) before the delete is sent: the command
   * journal's before-record of that delete need not be fsync'd on its own. */
  readonly intentsDurable?: boolean;
  mountUnmounted(path: string): void;
  deviceRemoved(name: string): void;
  /** The pool confirmed the id is gone (deleted now, or already). */
  thinDeleted(id: number): void;
  /** The delete was not done (busy, failed, a step before it did not go through): undo the intent. */
  thinDeleteAborted(id: number, why: string): void;
  /**
   * Write what is still held back (confirmations may ride along with the next orphan's claim, to
   * spend one durable transaction per delete; an unconfirmed `deleting` id is confirmed by the next
   * run). Called when the run stops acting.
   */
  flush?(): void;
}

export const NO_LEDGER: GcLedger = {
  claim: () => null,
  mountUnmounted() {},
  deviceRemoved() {},
  thinDeleted() {},
  thinDeleteAborted() {},
};

export interface ActOptions {
  pool: string;
  stepTimeoutMs?: number;
  /**
   * Inactive thin ids only (no device, no mount): re-check the pool after this long (default 5 s,
   * stretched to 200× the last status call so the checks cost at most ~0.5 % of the run, never
   * beyond CHECK_MAX_MS), and at once after any step that did not succeed. A delete on a pool that
   * went read-only fails in the kernel, which triggers the check, so the timed check only bounds how
   * long a pool that degrades without failing a delete goes unseen; a status call per delete would
   * double the cost of every delete. 0 = check before every orphan.
   */
  poolCheckEveryMs?: number;
  /**
   * performance.now() of a pool status read just before (the metadata scan's: ok, rw, no
   * needs_check): it counts as the first check, so bare deletes start without another status call.
   */
  poolCheckedAt?: number | undefined;
  ledger?: GcLedger;
  /** Devices as scanned, to re-check that a name is still the same device, mapping the same thin id. */
  scanned?: Map<string, DmDevice>;
  /** Mount table reader (tests). */
  mountinfo?: () => MountEntry[];
  signal?: AbortSignal;
}

function classifyDm(e: unknown): StepOutcome {
  if (isDmError(e, "not_found")) return "already_gone";
  if (isDmError(e, "busy")) return "busy";
  if (isDmError(e, "timeout")) return "timeout";
  return "failed";
}

/**
 * A pool `delete`: only "No data available" (ENODATA: the pool has no such thin id) means gone.
 * lib/dm calls "No such device" / "does not exist" not_found too, but for a message to the pool they
 * mean the POOL is missing: never count that as a confirmed delete.
 */
function classifyDelete(e: unknown): StepOutcome {
  if (isDmError(e)) {
    if (e.dmKind === "timeout") return "timeout";
    if (/No data available/i.test(e.result.stderr)) return "already_gone";
    if (/No such device|does not exist|No such file/i.test(e.result.stderr)) return "pool_gone";
    if (e.dmKind === "busy") return "busy";
  }
  return "failed";
}

function classifyCheck(e: unknown): StepOutcome {
  if (isDmError(e, "timeout")) return "timeout";
  if (e instanceof CommandError && e.result.timedOut) return "timeout";
  return "changed";
}

async function step(
  op: StepResult["op"],
  target: string,
  fn: () => Promise<StepOutcome | undefined>,
  classify: (e: unknown) => StepOutcome,
): Promise<StepResult> {
  const t0 = performance.now();
  let outcome: StepOutcome = "ok";
  let error: string | null = null;
  try {
    outcome = (await fn()) ?? "ok";
  } catch (e) {
    outcome = classify(e);
    error = errorMessage(e);
  }
  return { op, target, outcome, durationMs: Math.round(performance.now() - t0), error };
}

/** Pool usable for GC: status ok, rw, no needs_check. */
async function poolGate(pool: string, timeoutMs: number): Promise<ActResult["stopped"]> {
  try {
    const s = await poolStatus(pool, { timeoutMs, ctx: { pool_name: pool } });
    if (s.kind !== "ok") return { reason: "pool_not_rw", detail: `pool ${pool} is in ${s.kind === "fail" ? "Fail" : "Error"} state` };
    if (s.mode !== "rw") return { reason: "pool_not_rw", detail: `pool ${pool} is in ${s.mode} mode` };
    if (s.needsCheck) return { reason: "pool_not_rw", detail: `pool ${pool} has needs_check set` };
    return null;
  } catch (e) {
    return { reason: "pool_unreadable", detail: `pool ${pool} status: ${errorMessage(e)}` };
  }
}

/** The periodic pool check is stretched to this many times its own cost (so it stays ≤ ~0.5 % of a
 * run), up to CHECK_MAX_MS apart. */
const CHECK_STRETCH = 200;
const CHECK_MAX_MS = 20_000;

/** How long bare deletes go between pool checks, after a check that took `costMs`. */
export const checkInterval = (every: number, costMs: number): number => Math.min(Math.max(every, CHECK_STRETCH * costMs), Math.max(every, CHECK_MAX_MS));

/** When the pool's status is read again: before any device or mount, after any step that did not
 * succeed, and for bare deletes at least every `every` ms (stretched to CHECK_STRETCH × its cost). */
function poolChecks(pool: string, timeoutMs: number, every: number, checkedAt = Number.NEGATIVE_INFINITY) {
  let lastCheck = checkedAt;
  let interval = every;
  return {
    due: (a: Orphan, lastOk: boolean) => a.device !== null || a.unmount.length > 0 || !lastOk || performance.now() - lastCheck >= interval,
    async check(): Promise<ActResult["stopped"]> {
      const t0 = performance.now();
      const stopped = await poolGate(pool, timeoutMs);
      lastCheck = performance.now();
      if (every > 0) interval = checkInterval(every, lastCheck - t0);
      return stopped;
    },
  };
}

/** What every orphan's steps share. */
interface ActEnv {
  pool: string;
  timeoutMs: number;
  ledger: GcLedger;
  claims: Claims;
  mounts: () => MountEntry[];
  scanned: Map<string, DmDevice> | undefined;
  unmountedRemoved: string[];
}

const cmdCtx = (e: ActEnv, id: number | null, name: string | null) => ({ pool_name: e.pool, device_id: id ?? undefined, device_name: name ?? undefined });

/** One orphan's steps so far, and what they mean for it and for the run. */
class ActionRun {
  readonly res: ActionResult;
  stopped: ActResult["stopped"] = null;
  claimed = false;
  constructor(
    readonly a: Orphan,
    private readonly timeoutMs: number,
  ) {
    this.res = { action: a, outcome: "done", steps: [], skipReason: null };
  }
  get last(): StepResult | undefined {
    return this.res.steps.at(-1);
  }
  /** Record a step; true when the orphan may go on. */
  finish(s: StepResult): boolean {
    const res = this.res;
    res.steps.push(s);
    if (s.outcome === "ok" || s.outcome === "already_gone") return true;
    if (s.outcome === "busy" || s.outcome === "changed") {
      res.outcome = "skipped";
      res.skipReason = s.outcome === "busy" ? `${s.op} ${s.target}: busy; next run` : `${s.target}: ${s.error ?? "changed since the scan"}`;
    } else {
      res.outcome = "failed";
      if (s.outcome === "timeout")
        this.stopped = { reason: "timeout", detail: `${s.op} ${s.target} timed out after ${this.timeoutMs} ms: the host may be unhealthy` };
    }
    log.warn(`gc: ${s.op} ${s.target}: ${s.outcome}${s.error ? `: ${s.error}` : ""}`);
    return false;
  }
}

/** 1. The DB rows are still what the plan saw; a thin id to delete is marked `deleting`. */
async function claimStep(run: ActionRun, e: ActEnv): Promise<boolean> {
  const a = run.a;
  const target = a.thinId !== null ? `thin ${a.thinId}` : (a.device ?? "?");
  const s = await step(
    "claim",
    target,
    async () => {
      const why = e.claims.claim(a);
      if (why !== null) throw new Error(why);
      run.claimed = true;
      return undefined;
    },
    () => "changed",
  );
  return run.finish(s);
}

type DmInfo = NonNullable<Awaited<ReturnType<typeof dmsetup.info>>>;

/** The live table still maps the pool and thin id the scan saw. */
async function sameTable(e: ActEnv, name: string, id: number | null, was: DmDevice): Promise<void> {
  const table = await dmsetup.table(name, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, id, name) });
  const now = parseThinTable(table.trim() ? table : null);
  const same = was.thin === null ? now === null : now !== null && now.poolMajorMinor === was.thin.poolMajorMinor && now.thinId === was.thin.thinId;
  if (!same) throw new Error(`its table changed since the scan (now: ${table.trim() || "none"})`);
}

/** 2. The scan may be seconds old: the name must still be the device we planned on, with the same
 * table, idle but for our own mount. Returns the device as it is now (null: gone). */
async function checkDevice(run: ActionRun, e: ActEnv, name: string): Promise<{ ok: boolean; info: DmInfo | null }> {
  const a = run.a;
  const was = e.scanned?.get(name);
  let info: DmInfo | null = null;
  const s = await step(
    "check",
    name,
    async () => {
      const now = await dmsetup.info(name, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, a.thinId, name) });
      if (!now) return "already_gone";
      info = now;
      if (was && (now.major !== was.major || now.minor !== was.minor)) throw new Error("a different device now has this name");
      if (now.state === "SUSPENDED") throw new Error("now suspended");
      const ourMounted = a.unmount.some((p) => e.mounts().some((m) => m.mountPoint === p && m.majorMinor === `${now.major}:${now.minor}`));
      if (now.open > (ourMounted ? 1 : 0)) throw new Error(`open count is now ${now.open}${ourMounted ? " (beyond our own mount)" : ""}`);
      if (was) await sameTable(e, name, a.thinId, was);
      return undefined;
    },
    classifyCheck,
  );
  return { ok: run.finish(s), info };
}

/** 3. Our own mounts, each only if it is still this device mounted there. Returns whether any was
 * unmounted here, or null when a step did not go through. */
async function unmountOwn(run: ActionRun, e: ActEnv, info: DmInfo | null): Promise<boolean | null> {
  const a = run.a;
  const mm = info ? `${info.major}:${info.minor}` : null;
  let unmountedHere = false;
  for (const path of a.unmount) {
    const s = await step(
      "umount",
      path,
      async () => {
        const at = e.mounts().filter((m) => m.mountPoint === path);
        if (at.length === 0) return "already_gone";
        if (!at.every((m) => m.majorMinor === mm)) throw new Error(`${path} now has ${at.map((m) => m.majorMinor).join(", ")} mounted, not ${mm}`);
        await umount(path, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, a.thinId, a.device) });
        return undefined;
      },
      (err) => (err instanceof CommandError ? classifyDm(err) : "changed"),
    );
    if (!run.finish(s)) return null;
    e.ledger.mountUnmounted(path);
    if (s.outcome === "ok") unmountedHere = true;
  }
  return unmountedHere;
}

/** 4. After our unmount nothing holds the device (same device, open count 0). */
async function checkIdle(run: ActionRun, e: ActEnv, name: string, info: DmInfo | null): Promise<boolean> {
  const s = await step(
    "check",
    name,
    async () => {
      const now = await dmsetup.info(name, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, run.a.thinId, name) });
      if (!now) return "already_gone";
      if (now.major !== info?.major || now.minor !== info?.minor) throw new Error("a different device now has this name");
      if (now.open > 0) throw new Error(`open count is ${now.open} after our unmount`);
      return undefined;
    },
    classifyCheck,
  );
  return run.finish(s);
}

/** Steps 2–5 for an orphan with a device: check, unmount our own mounts, check idle, remove. */
async function deviceSteps(run: ActionRun, e: ActEnv, name: string): Promise<boolean> {
  const a = run.a;
  const { ok: checked, info } = await checkDevice(run, e, name);
  if (!checked) return false;
  const gone = run.last?.outcome === "already_gone";
  let unmountedHere = false;
  if (!gone && a.unmount.length > 0) {
    const u = await unmountOwn(run, e, info);
    if (u === null) return false;
    unmountedHere = u;
    if (!(await checkIdle(run, e, name, info))) return false;
  }
  if (run.last?.outcome !== "already_gone") {
    const s = await step(
      "remove",
      name,
      () => dmsetup.remove(name, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, a.thinId, name) }).then(() => undefined),
      classifyDm,
    );
    if (!run.finish(s)) return false;
  }
  e.ledger.deviceRemoved(name);
  if (unmountedHere && info) e.unmountedRemoved.push(`dm-${info.minor}`);
  return true;
}

/** 6. The pool `delete`; the ledger says `deleted` only once the pool confirmed it. */
async function deleteStep(run: ActionRun, e: ActEnv, id: number): Promise<void> {
  const s = await step(
    "delete",
    `thin ${id}`,
    () => deleteThin(e.pool, id, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, id, null), intentOnDisk: e.ledger.intentsDurable }).then(() => undefined),
    classifyDelete,
  );
  if (s.outcome === "pool_gone") {
    // "no such device" from a pool message: is the pool still there?
    const poolInfo = await dmsetup.info(e.pool, { timeoutMs: e.timeoutMs, ctx: cmdCtx(e, null, e.pool) }).catch(() => undefined);
    if (poolInfo === null) run.stopped = { reason: "pool_gone", detail: `pool ${e.pool} disappeared during the run: ${s.error ?? ""}` };
    s.outcome = "failed";
  }
  if (run.finish(s)) e.ledger.thinDeleted(id);
  // a timed-out delete may still land: leave the intent ('deleting'); the next run confirms it
  else if (s.outcome !== "timeout") e.ledger.thinDeleteAborted(id, `${s.outcome}: ${s.error ?? ""}`);
}

/** One orphan, start to finish. */
async function actOne(a: Orphan, e: ActEnv): Promise<ActionRun> {
  const run = new ActionRun(a, e.timeoutMs);
  let ok = await claimStep(run, e);
  if (ok && a.device) ok = await deviceSteps(run, e, a.device);
  if (ok && a.deleteThin && a.thinId !== null) await deleteStep(run, e, a.thinId);
  else if (!ok && run.claimed && a.deleteThin && a.thinId !== null) {
    const l = run.last;
    e.ledger.thinDeleteAborted(a.thinId, `${l?.op ?? "?"} ${l?.outcome ?? "?"}: ${l?.error ?? ""}`);
  }
  return run;
}

/** The run so far, as act()'s loop carries it from orphan to orphan. */
interface Progress {
  results: ActionResult[];
  stopped: ActResult["stopped"];
  lastOk: boolean;
}

/** The next orphan: the stop conditions first (signal, pool check), then its steps. */
async function actNext(a: Orphan, e: ActEnv, p: Progress, checks: ReturnType<typeof poolChecks>, signal: AbortSignal | undefined): Promise<void> {
  if (!p.stopped && signal?.aborted) p.stopped = { reason: "aborted", detail: "stop requested (signal)" };
  if (!p.stopped && checks.due(a, p.lastOk)) p.stopped = await checks.check();
  if (p.stopped) {
    e.claims.drop(a, `not run: ${p.stopped.reason}`);
    p.results.push({ action: a, outcome: "not_run", steps: [], skipReason: null });
    return;
  }
  const run = await actOne(a, e);
  p.results.push(run.res);
  p.stopped = run.stopped;
  p.lastOk = run.res.outcome === "done";
}

export async function act(actions: Orphan[], o: ActOptions): Promise<ActResult> {
  const ledger = o.ledger ?? NO_LEDGER;
  const e: ActEnv = {
    pool: o.pool,
    timeoutMs: o.stepTimeoutMs ?? STEP_TIMEOUT_MS,
    ledger,
    claims: new Claims(actions, ledger),
    mounts: o.mountinfo ?? mountinfo,
    scanned: o.scanned,
    unmountedRemoved: [],
  };
  const checks = poolChecks(o.pool, e.timeoutMs, o.poolCheckEveryMs ?? 5_000, o.poolCheckedAt);
  const p: Progress = { results: [], stopped: null, lastOk: true };
  try {
    for (let i = 0; i < actions.length; ) {
      const batch = p.stopped ? 1 : claimRun(actions, i).length;
      if (batch < 2) {
        await actNext(actions[i++]!, e, p, checks, o.signal);
        continue;
      }
      // a run of bare deletes (one pool message each) holds the host dm queue across them instead
      // of taking it per command, and lets go at once when someone else waits for it
      i = await withHostQueue(`gc --force: delete thin ids in pool ${o.pool}`, async () => {
        const end = i + batch;
        let k = i;
        do await actNext(actions[k++]!, e, p, checks, o.signal);
        while (k < end && !p.stopped && !queueWanted());
        return k;
      });
      // the batch's before-records went unsynced (their claims are durable): on disk now, as one
      syncJournal();
    }
  } finally {
    e.ledger.flush?.();
    syncJournal();
  }
  return { results: p.results, stopped: p.stopped, unmountedRemoved: e.unmountedRemoved };
}
