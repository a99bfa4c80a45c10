// Pool checks from ONE `dmsetup status <pool>`: exists, not Fail/Error, mode rw, needs_check,
// data and metadata use against thresholds, and the no-space policy.
import { isDmError } from "../dm/errors.ts";
import { poolStatus } from "../dm/pool.ts";
import type { PoolStatus } from "../dm/status.ts";
import { errorMessage } from "../errors.ts";
import { RUNBOOK } from "./runbook.ts";
import { type CheckResult, result, type Thresholds } from "./types.ts";

/** dm-thin holds back the last 10 % of the metadata blocks: a read-only pool at this use ran out. */
const OUT_OF_METADATA_PCT = 89;

/** Decide on an already-read status (pure; unit-tested with status line fixtures). */
export function judgePool(pool: string, st: PoolStatus, th: Thresholds): CheckResult[] {
  const out: CheckResult[] = [result("pool.exists", "ok", `pool ${pool} exists`)];
  if (st.kind !== "ok") {
    out.push(
      result("pool.status", "block", `pool ${pool} status is ${st.kind === "fail" ? "Fail" : "Error"}`, RUNBOOK.poolFailed, {
        status: st.kind,
      }),
    );
    return out;
  }
  out.push(result("pool.status", "ok", `pool ${pool} status readable (transaction ${st.transactionId})`));
  if (st.mode === "rw") out.push(result("pool.mode", "ok", "mode rw"));
  else if (st.mode === "ro" && st.metaUsedPct >= OUT_OF_METADATA_PCT && !st.needsCheck) {
    // the kernel keeps the last 10 % of the metadata in reserve and goes read-only when it is reached
    out.push(
      result("pool.mode", "block", `pool ${pool} is read-only (ro): out of metadata space (${st.metaUsedPct.toFixed(1)} % used)`, RUNBOOK.poolOutOfMeta, {
        mode: st.mode,
      }),
    );
  } else if (st.mode === "ro") out.push(result("pool.mode", "block", `pool ${pool} is read-only (ro)`, RUNBOOK.poolReadOnly, { mode: st.mode }));
  else out.push(result("pool.mode", "block", `pool ${pool} is out_of_data_space`, RUNBOOK.poolOutOfData, { mode: st.mode }));
  out.push(
    st.needsCheck
      ? result("pool.needs_check", "block", `pool ${pool} metadata is flagged needs_check`, RUNBOOK.poolNeedsCheck)
      : result("pool.needs_check", "ok", "needs_check not set"),
  );
  out.push(usage("pool.data", `data ${st.dataUsed}/${st.dataTotal} blocks`, st.dataUsedPct, th.dataWarnPct, th.dataBlockPct, RUNBOOK.poolData));
  out.push(usage("pool.metadata", `metadata ${st.metaUsed}/${st.metaTotal} blocks`, st.metaUsedPct, th.metaWarnPct, th.metaBlockPct, RUNBOOK.poolMeta));
  out.push(
    st.noSpace === "queue_if_no_space"
      ? result("pool.no_space_mode", "warn", `pool ${pool} uses queue_if_no_space (writers hang when it fills)`, RUNBOOK.poolQueue)
      : result("pool.no_space_mode", "ok", "error_if_no_space"),
  );
  return out;
}

function usage(name: string, what: string, pct: number, warn: number, block: number, runbook: string): CheckResult {
  const msg = `${what} used (${pct.toFixed(1)} %; warn ${warn} %, block ${block} %)`;
  const details = { used_pct: pct, warn_pct: warn, block_pct: block };
  if (pct >= block) return result(name, "block", msg, runbook, details);
  if (pct >= warn) return result(name, "warn", msg, runbook, details);
  return result(name, "ok", msg, "", details);
}

/** Read the pool's status (bounded by timeoutMs) and judge it. */
export async function checkPool(pool: string, th: Thresholds, timeoutMs: number): Promise<CheckResult[]> {
  let st: PoolStatus;
  try {
    st = await poolStatus(pool, { timeoutMs });
  } catch (e) {
    const stderr = isDmError(e) ? e.result.stderr : "";
    if (/kernel device-mapper driver|\/dev\/mapper\/control/i.test(stderr)) {
      return [result("pool.exists", "block", "device-mapper is not available in this kernel (cannot open /dev/mapper/control)", RUNBOOK.noDm)];
    }
    if (isDmError(e) && e.result.exitCode === 127) {
      return [result("pool.exists", "block", "dmsetup is not installed", RUNBOOK.noDm)];
    }
    if (isDmError(e, "not_found")) {
      return [result("pool.exists", "block", `pool ${pool} not found (no such device-mapper device)`, RUNBOOK.poolMissing)];
    }
    if (isDmError(e, "timeout")) {
      return [result("pool.status", "block", `dmsetup status ${pool} timed out after ${timeoutMs} ms`, RUNBOOK.poolStatusUnreadable)];
    }
    // includes an unparsable line (e.g. the name belongs to a non-thin-pool device)
    return [result("pool.status", "block", `cannot read the status of pool ${pool}: ${errorMessage(e)}`, RUNBOOK.poolStatusUnreadable)];
  }
  return judgePool(pool, st, th);
}
