// I/O wait from two /proc/stat samples: the share of all CPU time spent idle waiting for I/O over
// the window. A host this saturated turns every dm metadata commit into a long stall.
import { RUNBOOK } from "./runbook.ts";
import { type CheckResult, result, type Thresholds } from "./types.ts";

export interface CpuSample {
  iowait: number;
  total: number;
}

/** The aggregate "cpu" line of /proc/stat. guest time is already inside user, so it is not added. */
export function parseCpuLine(procStat: string): CpuSample {
  const line = procStat.split("\n").find((l) => l.startsWith("cpu "));
  if (!line) throw new Error("no aggregate cpu line in /proc/stat");
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  return { iowait, total: user + nice + system + idle + iowait + irq + softirq + steal };
}

export function judgeIowait(before: string, after: string, windowMs: number, th: Thresholds): CheckResult {
  const a = parseCpuLine(before);
  const b = parseCpuLine(after);
  const dt = b.total - a.total;
  // iowait can go backwards on some kernels (per-CPU accounting quirk): clamp.
  const dio = Math.max(0, b.iowait - a.iowait);
  if (dt <= 0) return result("host.iowait", "ok", `no CPU ticks elapsed in ${windowMs} ms; iowait not measurable`, "", { ticks: 0 });
  const pct = Math.min(100, (dio / dt) * 100);
  const msg = `iowait ${pct.toFixed(0)} % over ${windowMs} ms (${dio}/${dt} ticks; warn > ${th.iowaitWarnPct} %, block > ${th.iowaitBlockPct} %)`;
  const details = { iowait_pct: Math.round(pct * 10) / 10, ticks: dt, window_ms: windowMs };
  if (pct > th.iowaitBlockPct) return result("host.iowait", "block", msg, RUNBOOK.iowait, details);
  if (pct > th.iowaitWarnPct) return result("host.iowait", "warn", msg, RUNBOOK.iowait, details);
  return result("host.iowait", "ok", msg, "", details);
}
