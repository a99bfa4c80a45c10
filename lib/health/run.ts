// Run every health check concurrently, each bounded by its own timeout (a check that does not
// answer is itself a blocking finding: on a wedged kernel, reads of /proc or dmsetup hang).
// runHealthChecks() reports; assertHealthy() is what the pipeline and GC call before dm work.
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { checkDmesg } from "./dmesg.ts";
import { judgeDState, scanDState, stuckOnDm } from "./dstate.ts";
import { type HealthIo, procIo } from "./io.ts";
import { judgeIowait, parseCpuLine } from "./iowait.ts";
import { DEFAULT_KERNEL_ERROR_WINDOW_MS } from "./kernel-findings.ts";
import { judgeMemory } from "./memory.ts";
import { checkPool } from "./pool.ts";
import { RUNBOOK } from "./runbook.ts";
import { checkSuspended } from "./suspended.ts";
import { type CheckResult, DEFAULT_THRESHOLDS, type HealthReport, result, type Thresholds } from "./types.ts";

export interface HealthOptions {
  /** Pool to check; null/undefined skips the pool checks (host only). */
  pool?: string | null | undefined;
  thresholds?: Partial<Thresholds> | undefined;
  /** Where the dmesg cursor lives; without it the last lookbackMs of the log counts every time. */
  stateDir?: string | undefined;
  /** Per-check limit, default 10 s. */
  timeoutMs?: number | undefined;
  /** Minimum window between the two /proc/stat and D-state samples (default 20 ms). The window
   *  also spans the pool and kernel-log checks, so it costs nothing extra when those are slower. */
  sampleMs?: number | undefined;
  /** Without a cursor, how far back kernel messages count; default: the kernel-error window. */
  lookbackMs?: number | undefined;
  /** A kernel error blocks until it is this old or acknowledged; default 15 min. */
  kernelErrorWindowMs?: number | undefined;
  /** Injected readers (unit tests). */
  io?: HealthIo | undefined;
}

export const DEFAULT_CHECK_TIMEOUT_MS = 10_000;
export const DEFAULT_SAMPLE_MS = 20;
/** iowait needs a few scheduler ticks (USER_HZ 100 × CPUs) to mean anything; sample longer until then. */
const MIN_IOWAIT_TICKS = 4;
const MAX_IOWAIT_WINDOW_MS = 200;

async function bounded(name: string, timeoutMs: number, work: () => Promise<CheckResult | CheckResult[]>): Promise<CheckResult[]> {
  const t0 = performance.now();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<CheckResult[]>((resolve) => {
    timer = setTimeout(() => resolve([result(name, "block", `check did not finish within ${timeoutMs} ms`, RUNBOOK.timeout, { timed_out: true })]), timeoutMs);
  });
  const done = work().then(
    (r) => (Array.isArray(r) ? r : [r]),
    (e: unknown) => [result(name, "block", `check failed: ${e instanceof Error ? e.message : String(e)}`, RUNBOOK.timeout)],
  );
  const out = await Promise.race([done, timeout]);
  clearTimeout(timer);
  const ms = Math.round((performance.now() - t0) * 10) / 10;
  for (const r of out) r.durationMs = ms;
  return out;
}

function ticks(before: string, after: string): number {
  try {
    return parseCpuLine(after).total - parseCpuLine(before).total;
  } catch {
    return Number.POSITIVE_INFINITY; // unparsable: let judgeIowait report it
  }
}

export async function runHealthChecks(o: HealthOptions = {}): Promise<HealthReport> {
  const t0 = performance.now();
  const io = o.io ?? procIo;
  const th: Thresholds = { ...DEFAULT_THRESHOLDS, ...o.thresholds };
  const timeoutMs = o.timeoutMs ?? DEFAULT_CHECK_TIMEOUT_MS;
  const sampleMs = o.sampleMs ?? DEFAULT_SAMPLE_MS;
  const pool = o.pool ?? null;

  // First samples now; the second ones once the window has passed AND the pool/log checks are done.
  const stat1 = io.readText("/proc/stat");
  const d1 = scanDState(io);
  let windowStart = performance.now();
  const firstDone = Promise.allSettled([stat1, d1]).then(() => {
    windowStart = performance.now();
  });
  const poolP = pool
    ? Promise.all([
        bounded("pool.status", timeoutMs, () => checkPool(pool, th, timeoutMs)),
        bounded("pool.suspended", timeoutMs, () => checkSuspended(pool, timeoutMs)),
      ]).then((r) => r.flat())
    : Promise.resolve([]);
  const windowMs = o.kernelErrorWindowMs ?? DEFAULT_KERNEL_ERROR_WINDOW_MS;
  const dmesgP = bounded("host.dmesg", timeoutMs, () => checkDmesg(io, { stateDir: o.stateDir, lookbackMs: o.lookbackMs ?? windowMs, windowMs }));
  const window = Promise.all([firstDone.then(() => io.sleep(sampleMs)), poolP, dmesgP]);

  const checks = await Promise.all([
    poolP,
    bounded("host.dstate", timeoutMs, async () => {
      const first = await d1;
      await window;
      const windowMs = Math.round(performance.now() - windowStart);
      // only the ones in D before can be stuck; a full rescan would cost as much as the first
      const second = first.size ? await scanDState(io, [...new Set([...first.values()].map((s) => String(s.pid)))]) : first;
      const stuck = await stuckOnDm(io, first, second);
      return judgeDState(stuck, windowMs, first.size - stuck.length);
    }),
    dmesgP,
    bounded("host.memory", timeoutMs, async () => judgeMemory(await io.readText("/proc/meminfo"), th)),
    bounded("host.iowait", timeoutMs, async () => {
      const before = await stat1;
      await window;
      let after = await io.readText("/proc/stat");
      while (ticks(before, after) < MIN_IOWAIT_TICKS && performance.now() - windowStart < MAX_IOWAIT_WINDOW_MS) {
        await io.sleep(10);
        after = await io.readText("/proc/stat");
      }
      return judgeIowait(before, after, Math.round(performance.now() - windowStart), th);
    }),
  ]);
  const flat = checks.flat();
  return {
    healthy: !flat.some((c) => c.status === "block"),
    pool,
    checks: flat,
    durationMs: Math.round((performance.now() - t0) * 10) / 10,
  };
}

/** Run the checks; log warnings; throw ThinimgError("unhealthy") naming the first blocking check. */
export async function assertHealthy(o: HealthOptions = {}): Promise<HealthReport> {
  const report = await runHealthChecks(o);
  for (const c of report.checks) if (c.status === "warn") log.warn(`health: ${c.name}: ${c.message}`);
  return assertReport(report);
}

/** Throw ThinimgError("unhealthy") naming the first blocking check of a report (no logging). */
export function assertReport(report: HealthReport): HealthReport {
  const blocking = report.checks.filter((c) => c.status === "block");
  if (blocking.length > 0) {
    const first = blocking[0]!;
    const more =
      blocking.length > 1
        ? ` (+${blocking.length - 1} more: ${blocking
            .slice(1)
            .map((c) => c.name)
            .join(", ")})`
        : "";
    throw new ThinimgError("unhealthy", `health check ${first.name} blocks dm work: ${first.message}${more}`, {
      hint: first.runbook,
      details: { checks: report.checks },
    });
  }
  return report;
}
