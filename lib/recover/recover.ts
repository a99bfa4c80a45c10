// recover-pool: the ADR's manual recovery procedure as code. It brings a loop-backed thin pool back
// from its record (DIR/pool.json) after a reboot or panic, or creates a new one. Rules it never
// breaks: it never overwrites a backing file, never reloads or removes a live pool, never loads a
// pool whose metadata failed thin_check (unless --repair rebuilt it), never leaves the pool
// suspended, and on an error it stops where it is (fail dumb) and says what to run next.
//
// The run, step by step: preflight.ts → create.ts (--create) or load.ts (the record) → grow.ts
// (--grow-*, or a grow a crash interrupted) or bring-up.ts → files.ts → active.ts (loaded: check,
// resume) or inactive.ts (attach, check-metadata.ts, load) → verify.ts. run.ts holds the run's state.
import { assertDevPath, assertDmName } from "../dm/validate.ts";
import { fromErrno, ThinimgError } from "../errors.ts";
import { bringUp } from "./bring-up.ts";
import { create } from "./create.ts";
import { growPool } from "./grow.ts";
import { loadRecord } from "./load.ts";
import { preflight } from "./preflight.ts";
import { validateCreateSpec } from "./record.ts";
import type { RecoverReport } from "./report.ts";
import { type RecoverOptions, RecoverRun } from "./run.ts";

export { TOOL_PACKAGES } from "./preflight.ts";
export type { RecoverReport } from "./report.ts";
export type { Probe, RecoverOptions } from "./run.ts";

/** Run recover-pool (or --create). Operator-facing failures come back as a "blocked" report;
 * only bugs throw. */
export async function recoverPool(o: RecoverOptions): Promise<RecoverReport> {
  const r = new RecoverRun(o);
  try {
    assertDevPath(r.dir);
    if (o.pool !== undefined) assertDmName(o.pool, "pool name");
    const spec = o.create ? validateCreateSpec(o.create) : null;
    await preflight(r);
    if (spec) await create(r, spec);
    else {
      const rec = loadRecord(r);
      // a grow interrupted by a crash is finished by whatever run comes next
      if (o.grow || rec.grow) await growPool(r, rec, o.grow);
      else await bringUp(r, rec);
    }
    return r.report(null);
  } catch (e) {
    if (e instanceof ThinimgError) return r.report(e);
    // a read-only or full disk, a missing directory, no permission: the operator's to fix
    const fs = fromErrno(e);
    if (fs) return r.report(fs);
    throw e;
  } finally {
    r.lock?.release();
  }
}
