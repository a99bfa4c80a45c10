// The boot runbook as one call: recover-pool holds the state dir exclusively (no unpack, activation
// or release runs while the pool is changed under it); once that is released, every snapshot the
// state DB holds as handed out is re-attached, as a shared holder like any activation.
import { existsSync } from "node:fs";
import { useCommandJournal } from "../cmd-journal.ts";
import type { Config } from "../config.ts";
import { holdExclusive } from "../lock/holders.ts";
import { describeHolder } from "../lock/owner.ts";
import { log } from "../log.ts";
import { type ReattachAllReport, reattachPool } from "../pipeline/reattach.ts";
import { type RecoverOptions, type RecoverReport, recoverPool } from "./recover.ts";

export interface BootOptions extends RecoverOptions {
  /** The command's config (state dir, lock wait), resolved once by the command. */
  cfg: Config;
  ignoreLock?: boolean;
  /** Re-attach the handed-out snapshots once the pool is up (not with --create). */
  reattach?: boolean;
}

export interface BootResult {
  report: RecoverReport;
  reattach: ReattachAllReport | null;
  /** Lines an operator must see whatever the log level (e.g. --ignore-lock going ahead). */
  warnings: string[];
  exitCode: number;
}

export async function recoverAndReattach(o: BootOptions): Promise<BootResult> {
  const { cfg } = o;
  // the before-records go to the state dir's journal once there is one (a fresh host has none yet)
  if (existsSync(cfg.stateDir)) useCommandJournal(cfg.stateDir);
  const hold = o.dryRun
    ? { ignored: [], release() {} }
    : await holdExclusive(cfg.stateDir, {
        waitMs: cfg.lockWaitMs,
        ignoreLock: o.ignoreLock === true,
        command: "bun ops/recover-pool.ts",
        what: "recover-pool",
      });
  // holdExclusive logs it too; the runbook's quiet log level must not hide it
  const warnings =
    hold.ignored.length && log.level < 1
      ? [`warning: --ignore-lock: going ahead while ${hold.ignored.map(describeHolder).join("; ")} use(s) the state dir`]
      : [];
  let report: RecoverReport;
  try {
    report = await recoverPool({ ...o, defaultPool: cfg.pool });
  } finally {
    hold.release();
  }
  const reattach =
    report.ok && !o.create && o.reattach !== false && report.pool ? await reattachPool({ ...cfg, pool: report.pool }, { dryRun: o.dryRun }) : null;
  return { report, reattach, warnings, exitCode: report.exit_code || (reattach && !reattach.ok ? 1 : 0) };
}
