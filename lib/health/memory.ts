// Memory pressure from /proc/meminfo: MemAvailable share of MemTotal, and swap use. Under heavy
// reclaim the kernel stalls writeback, and dm-thin metadata commits stall with it.
import { RUNBOOK } from "./runbook.ts";
import { type CheckResult, result, type Thresholds } from "./types.ts";

/** /proc/meminfo → kB values by key. */
export function parseMeminfo(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^([\w()]+):\s+(\d+)/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

const mib = (kb: number) => `${Math.round(kb / 1024)} MiB`;

export function judgeMemory(text: string, th: Thresholds): CheckResult[] {
  const m = parseMeminfo(text);
  const total = m.MemTotal;
  // Kernels before 3.14 lack MemAvailable; approximate it the way free(1) used to.
  const avail = m.MemAvailable ?? (m.MemFree ?? 0) + (m.Cached ?? 0) + (m.Buffers ?? 0);
  const out: CheckResult[] = [];
  if (!total) {
    out.push(result("host.memory", "warn", "cannot read MemTotal from /proc/meminfo", RUNBOOK.memory));
  } else {
    const pct = (avail / total) * 100;
    const msg = `MemAvailable ${mib(avail)} of ${mib(total)} (${pct.toFixed(1)} %; warn < ${th.memWarnPct} %, block < ${th.memBlockPct} %)`;
    const details = { available_pct: Math.round(pct * 100) / 100, available_kb: avail, total_kb: total };
    out.push(
      pct < th.memBlockPct
        ? result("host.memory", "block", msg, RUNBOOK.memory, details)
        : pct < th.memWarnPct
          ? result("host.memory", "warn", msg, RUNBOOK.memory, details)
          : result("host.memory", "ok", msg, "", details),
    );
  }
  const swapTotal = m.SwapTotal ?? 0;
  if (swapTotal === 0) {
    out.push(result("host.swap", "ok", "no swap configured"));
  } else {
    const used = swapTotal - (m.SwapFree ?? 0);
    const pct = (used / swapTotal) * 100;
    const msg = `swap ${mib(used)} of ${mib(swapTotal)} used (${pct.toFixed(1)} %; warn > ${th.swapWarnPct} %, block > ${th.swapBlockPct} %)`;
    const details = { used_pct: Math.round(pct * 100) / 100 };
    out.push(
      pct > th.swapBlockPct
        ? result("host.swap", "block", msg, RUNBOOK.swap, details)
        : pct > th.swapWarnPct
          ? result("host.swap", "warn", msg, RUNBOOK.swap, details)
          : result("host.swap", "ok", msg, "", details),
    );
  }
  return out;
}
