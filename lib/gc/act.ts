// Carry out a plan, one orphan at a time, each step bounded: unmount our own mount → `dmsetup
// remove` (never --force) → pool `delete`. "Gone already" is success; "busy" leaves the orphan for
// the next run; a timeout means the host is not healthy, so the run stops. Before every orphan the
// pool must still be rw (and not needs_check): the moment it is not, nothing more is touched.
// The ledger is told before a delete is sent and after the pool confirms it, so a thin id is never
// handed out again until the pool has really let go of it.
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { umount } from "../dm/mount.ts";
import { deleteThin, poolStatus } from "../dm/pool.ts";
import { errorMessage } from "../errors.ts";
import { CommandError } from "../exec.ts";
import { log } from "../log.ts";
import type { DmDevice, Orphan } from "./model.ts";

export const STEP_TIMEOUT_MS = 10_000;

export type StepOutcome = "ok" | "already_gone" | "busy" | "changed" | "failed" | "timeout";

export interface StepResult {
  op: "umount" | "check" | "remove" | "delete";
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
  stopped: { reason: "pool_not_rw" | "pool_unreadable" | "timeout" | "aborted"; detail: string } | null;
}

/** What GC writes to the DB while acting (store-backed in run.ts; no-op in tests of the dm side). */
export interface GcLedger {
  mountUnmounted(path: string): void;
  deviceRemoved(name: string): void;
  /** Before the delete is sent (intent). */
  thinDeleting(id: number): void;
  /** The pool confirmed the id is gone (deleted now, or already). */
  thinDeleted(id: number): void;
  /** The delete did not happen (busy, failed): undo the intent. */
  thinDeleteAborted(id: number, why: string): void;
}

export const NO_LEDGER: GcLedger = {
  mountUnmounted() {},
  deviceRemoved() {},
  thinDeleting() {},
  thinDeleted() {},
  thinDeleteAborted() {},
};

export interface ActOptions {
  pool: string;
  stepTimeoutMs?: number;
  /**
   * Inactive thin ids only (no device, no mount): re-check the pool after this long (default 1 s,
   * stretched to 10× the last status call so the checks never cost more than ~10 % of the run),
   * and at once after any step that did not succeed. A delete on a pool that went read-only fails
   * in the kernel, which triggers the check; a status call per delete would double the cost of
   * every delete. 0 = check before every orphan.
   */
  poolCheckEveryMs?: number;
  ledger?: GcLedger;
  /** Devices as scanned, to re-check that a name still maps the same thin id before removing it. */
  scanned?: Map<string, DmDevice>;
  signal?: AbortSignal;
}

function classifyUmount(e: unknown): StepOutcome {
  if (e instanceof CommandError) {
    if (e.result.timedOut) return "timeout";
    const s = e.result.stderr;
    if (/not mounted|no mount point specified|mountpoint not found/i.test(s)) return "already_gone";
    if (/busy/i.test(s)) return "busy";
  }
  return "failed";
}

function classifyDm(e: unknown): StepOutcome {
  if (isDmError(e, "not_found")) return "already_gone";
  if (isDmError(e, "busy")) return "busy";
  if (isDmError(e, "timeout")) return "timeout";
  return "failed";
}

async function step(op: StepResult["op"], target: string, fn: () => Promise<StepOutcome | undefined>, classify: (e: unknown) => StepOutcome): Promise<StepResult> {
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

export async function act(actions: Orphan[], o: ActOptions): Promise<ActResult> {
  const timeoutMs = o.stepTimeoutMs ?? STEP_TIMEOUT_MS;
  const ledger = o.ledger ?? NO_LEDGER;
  const results: ActionResult[] = [];
  let stopped: ActResult["stopped"] = null;
  const every = o.poolCheckEveryMs ?? 1_000;
  let lastCheck = Number.NEGATIVE_INFINITY;
  let interval = every;
  let lastOk = true;
  const ctx = (id: number | null, name: string | null) => ({ pool_name: o.pool, device_id: id ?? undefined, device_name: name ?? undefined });

  for (const a of actions) {
    if (!stopped && o.signal?.aborted) stopped = { reason: "aborted", detail: "stop requested (signal)" };
    // devices and mounts: always check first; bare deletes: see poolCheckEveryMs
    if (!stopped && (a.device !== null || a.unmount.length > 0 || !lastOk || performance.now() - lastCheck >= interval)) {
      const t0 = performance.now();
      stopped = await poolGate(o.pool, timeoutMs);
      lastCheck = performance.now();
      if (every > 0) interval = Math.max(every, 10 * (lastCheck - t0));
    }
    if (stopped) {
      results.push({ action: a, outcome: "not_run", steps: [], skipReason: null });
      continue;
    }
    const steps: StepResult[] = [];
    const res: ActionResult = { action: a, outcome: "done", steps, skipReason: null };
    results.push(res);
    const finish = (s: StepResult): boolean => {
      steps.push(s);
      if (s.outcome === "ok" || s.outcome === "already_gone") return true;
      if (s.outcome === "busy" || s.outcome === "changed") {
        res.outcome = "skipped";
        res.skipReason = s.outcome === "busy" ? `${s.op} ${s.target}: busy; next run` : `${s.target}: ${s.error ?? "changed since the scan"}`;
      } else {
        res.outcome = "failed";
        if (s.outcome === "timeout") stopped = { reason: "timeout", detail: `${s.op} ${s.target} timed out after ${timeoutMs} ms: the host may be unhealthy` };
      }
      log.warn(`gc: ${s.op} ${s.target}: ${s.outcome}${s.error ? `: ${s.error}` : ""}`);
      return false;
    };

    let ok = true;
    for (const path of a.unmount) {
      ok = finish(await step("umount", path, () => umount(path, { timeoutMs, ctx: ctx(a.thinId, a.device) }).then(() => undefined), classifyUmount));
      if (!ok) break;
      ledger.mountUnmounted(path);
    }
    if (ok && a.device) {
      const name = a.device;
      // the scan may be seconds old: the name must still be the device we planned on, idle
      ok = finish(
        await step(
          "check",
          name,
          async () => {
            const info = await dmsetup.info(name, { timeoutMs, ctx: ctx(a.thinId, name) });
            if (!info) return "already_gone";
            if (info.open > 0) throw new Error(`open count is now ${info.open}`);
            if (info.state === "SUSPENDED") throw new Error("now suspended");
            const was = o.scanned?.get(name);
            if (was && (info.major !== was.major || info.minor !== was.minor)) throw new Error("a different device now has this name");
            return undefined;
          },
          (e) => (isDmError(e, "timeout") ? "timeout" : "changed"),
        ),
      );
      if (ok && steps.at(-1)?.outcome !== "already_gone") {
        ok = finish(await step("remove", name, () => dmsetup.remove(name, { timeoutMs, ctx: ctx(a.thinId, name) }).then(() => undefined), classifyDm));
      }
      if (ok) ledger.deviceRemoved(name);
    }
    if (ok && a.deleteThin && a.thinId !== null) {
      const id = a.thinId;
      ledger.thinDeleting(id);
      const s = await step("delete", `thin ${id}`, () => deleteThin(o.pool, id, { timeoutMs, ctx: ctx(id, null) }).then(() => undefined), classifyDm);
      ok = finish(s);
      if (ok) ledger.thinDeleted(id);
      // a timed-out delete may still land: leave the intent ('deleting'); the next run confirms it
      else if (s.outcome !== "timeout") ledger.thinDeleteAborted(id, `${s.outcome}: ${s.error ?? ""}`);
    }
    lastOk = res.outcome === "done";
  }
  return { results, stopped };
}
