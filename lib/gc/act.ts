// Carry out a plan, one orphan at a time, each step bounded. Per orphan:
//   claim   the DB rows are still what the plan saw (compare-and-set; a thin id to delete is marked
//           `deleting` in the same transaction) — an unpack re-run that picked it up wins
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
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { type MountEntry, mountinfo, umount } from "../dm/mount.ts";
import { deleteThin, parseThinTable, poolStatus } from "../dm/pool.ts";
import { errorMessage } from "../errors.ts";
import { CommandError } from "../exec.ts";
import { log } from "../log.ts";
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
  mountUnmounted(path: string): void;
  deviceRemoved(name: string): void;
  /** The pool confirmed the id is gone (deleted now, or already). */
  thinDeleted(id: number): void;
  /** The delete was not done (busy, failed, a step before it did not go through): undo the intent. */
  thinDeleteAborted(id: number, why: string): void;
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
   * Inactive thin ids only (no device, no mount): re-check the pool after this long (default 1 s,
   * stretched to 10× the last status call so the checks never cost more than ~10 % of the run),
   * and at once after any step that did not succeed. A delete on a pool that went read-only fails
   * in the kernel, which triggers the check; a status call per delete would double the cost of
   * every delete. 0 = check before every orphan.
   */
  poolCheckEveryMs?: number;
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

export async function act(actions: Orphan[], o: ActOptions): Promise<ActResult> {
  const timeoutMs = o.stepTimeoutMs ?? STEP_TIMEOUT_MS;
  const ledger = o.ledger ?? NO_LEDGER;
  const results: ActionResult[] = [];
  const unmountedRemoved: string[] = [];
  let stopped: ActResult["stopped"] = null;
  const every = o.poolCheckEveryMs ?? 1_000;
  let lastCheck = Number.NEGATIVE_INFINITY;
  let interval = every;
  let lastOk = true;
  const mounts = o.mountinfo ?? mountinfo;
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
    let claimed = false;
    const abortIntent = (why: string) => {
      if (claimed && a.deleteThin && a.thinId !== null) ledger.thinDeleteAborted(a.thinId, why);
    };
    // 1. the DB rows are still what the plan saw; the id is marked `deleting`
    ok = finish(
      await step(
        "claim",
        a.thinId !== null ? `thin ${a.thinId}` : (a.device ?? "?"),
        async () => {
          const why = ledger.claim(a);
          if (why !== null) throw new Error(why);
          claimed = true;
          return undefined;
        },
        () => "changed",
      ),
    );
    let info: Awaited<ReturnType<typeof dmsetup.info>> = null;
    if (ok && a.device) {
      const name = a.device;
      const was = o.scanned?.get(name);
      // 2. the scan may be seconds old: the name must still be the device we planned on, with the
      //    same table, idle but for our own mount
      ok = finish(
        await step(
          "check",
          name,
          async () => {
            info = await dmsetup.info(name, { timeoutMs, ctx: ctx(a.thinId, name) });
            if (!info) return "already_gone";
            if (was && (info.major !== was.major || info.minor !== was.minor)) throw new Error("a different device now has this name");
            if (info.state === "SUSPENDED") throw new Error("now suspended");
            const ourMounted = a.unmount.some((p) => mounts().some((m) => m.mountPoint === p && m.majorMinor === `${info!.major}:${info!.minor}`));
            if (info.open > (ourMounted ? 1 : 0)) throw new Error(`open count is now ${info.open}${ourMounted ? " (beyond our own mount)" : ""}`);
            if (was) {
              const table = await dmsetup.table(name, { timeoutMs, ctx: ctx(a.thinId, name) });
              const now = parseThinTable(table.trim() ? table : null);
              const same = was.thin === null ? now === null : now !== null && now.poolMajorMinor === was.thin.poolMajorMinor && now.thinId === was.thin.thinId;
              if (!same) throw new Error(`its table changed since the scan (now: ${table.trim() || "none"})`);
            }
            return undefined;
          },
          classifyCheck,
        ),
      );
      const gone = steps.at(-1)?.outcome === "already_gone";
      let unmountedHere = false;
      // 3. our own mounts, each only if it is still this device mounted there
      for (const path of gone ? [] : a.unmount) {
        if (!ok) break;
        const mm = info ? `${(info as { major: number }).major}:${(info as { minor: number }).minor}` : null;
        ok = finish(
          await step(
            "umount",
            path,
            async () => {
              const at = mounts().filter((m) => m.mountPoint === path);
              if (at.length === 0) return "already_gone";
              if (!at.every((m) => m.majorMinor === mm)) throw new Error(`${path} now has ${at.map((m) => m.majorMinor).join(", ")} mounted, not ${mm}`);
              await umount(path, { timeoutMs, ctx: ctx(a.thinId, a.device) });
              return undefined;
            },
            (e) => (e instanceof CommandError ? classifyDm(e) : "changed"),
          ),
        );
        if (ok) ledger.mountUnmounted(path);
        if (ok && steps.at(-1)?.outcome === "ok") unmountedHere = true;
      }
      // 4. nothing holds it now; 5. remove it
      if (ok && !gone && a.unmount.length > 0) {
        ok = finish(
          await step(
            "check",
            name,
            async () => {
              const now = await dmsetup.info(name, { timeoutMs, ctx: ctx(a.thinId, name) });
              if (!now) return "already_gone";
              if (now.major !== (info as { major: number } | null)?.major || now.minor !== (info as { minor: number } | null)?.minor)
                throw new Error("a different device now has this name");
              if (now.open > 0) throw new Error(`open count is ${now.open} after our unmount`);
              return undefined;
            },
            classifyCheck,
          ),
        );
      }
      if (ok && steps.at(-1)?.outcome !== "already_gone") {
        ok = finish(await step("remove", name, () => dmsetup.remove(name, { timeoutMs, ctx: ctx(a.thinId, name) }).then(() => undefined), classifyDm));
      }
      if (ok) ledger.deviceRemoved(name);
      if (ok && unmountedHere && info) unmountedRemoved.push(`dm-${(info as { minor: number }).minor}`);
    }
    if (ok && a.deleteThin && a.thinId !== null) {
      const id = a.thinId;
      const s = await step("delete", `thin ${id}`, () => deleteThin(o.pool, id, { timeoutMs, ctx: ctx(id, null) }).then(() => undefined), classifyDelete);
      if (s.outcome === "pool_gone") {
        // "no such device" from a pool message: is the pool still there?
        const poolInfo = await dmsetup.info(o.pool, { timeoutMs, ctx: ctx(null, o.pool) }).catch(() => undefined);
        if (poolInfo === null) stopped = { reason: "pool_gone", detail: `pool ${o.pool} disappeared during the run: ${s.error ?? ""}` };
        s.outcome = "failed";
      }
      ok = finish(s);
      if (ok) ledger.thinDeleted(id);
      // a timed-out delete may still land: leave the intent ('deleting'); the next run confirms it
      else if (s.outcome !== "timeout") ledger.thinDeleteAborted(id, `${s.outcome}: ${s.error ?? ""}`);
    } else if (!ok) abortIntent(`${steps.at(-1)?.op ?? "?"} ${steps.at(-1)?.outcome ?? "?"}: ${steps.at(-1)?.error ?? ""}`);
    lastOk = res.outcome === "done";
  }
  return { results, stopped, unmountedRemoved };
}
