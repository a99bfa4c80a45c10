// Shapes shared by the health checks. A check never throws: it returns ok / warn / block with one
// line saying what it saw and a runbook step saying what to do (docs/ops-health.md).

export type CheckStatus = "ok" | "warn" | "block";

export interface CheckResult {
  /** Stable id, e.g. "pool.data", "host.memory" (used in --json and docs anchors). */
  name: string;
  status: CheckStatus;
  message: string;
  /** The operator's next step ("" when ok). */
  runbook: string;
  durationMs: number;
  details?: Record<string, unknown>;
}

export interface Thresholds {
  /** Pool data use, percent. */
  dataWarnPct: number;
  dataBlockPct: number;
  /** Pool metadata use, percent (metadata exhaustion is worse than data: the pool goes read-only). */
  metaWarnPct: number;
  metaBlockPct: number;
  /** MemAvailable as a percent of MemTotal: below these. */
  memWarnPct: number;
  memBlockPct: number;
  /** Swap used, percent of SwapTotal: above these. */
  swapWarnPct: number;
  swapBlockPct: number;
  /** Share of CPU time in iowait over the sample window: above these. */
  iowaitWarnPct: number;
  iowaitBlockPct: number;
}

export const DEFAULT_THRESHOLDS: Thresholds = {
  dataWarnPct: 80,
  dataBlockPct: 95,
  metaWarnPct: 75,
  metaBlockPct: 90,
  memWarnPct: 10,
  memBlockPct: 5,
  swapWarnPct: 50,
  swapBlockPct: 80,
  iowaitWarnPct: 25,
  iowaitBlockPct: 50,
};

export interface HealthReport {
  /** False when any check blocks (warnings are healthy). */
  healthy: boolean;
  pool: string | null;
  checks: CheckResult[];
  durationMs: number;
}

/** Build a result (durationMs is filled in by the runner). */
export function result(name: string, status: CheckStatus, message: string, runbook = "", details?: Record<string, unknown>): CheckResult {
  return { name, status, message, runbook: status === "ok" ? "" : runbook, durationMs: 0, ...(details ? { details } : {}) };
}

/** A report as `health --json` and the service's /readyz print it: snake_case keys. */
export function reportJson(r: HealthReport) {
  return {
    healthy: r.healthy,
    pool: r.pool,
    duration_ms: r.durationMs,
    checks: r.checks.map((c) => ({
      name: c.name,
      status: c.status,
      message: c.message,
      runbook: c.runbook,
      duration_ms: c.durationMs,
      ...(c.details ? { details: c.details } : {}),
    })),
  };
}

export function thresholdsJson(t: Thresholds) {
  return {
    data_warn_pct: t.dataWarnPct,
    data_block_pct: t.dataBlockPct,
    meta_warn_pct: t.metaWarnPct,
    meta_block_pct: t.metaBlockPct,
    mem_warn_pct: t.memWarnPct,
    mem_block_pct: t.memBlockPct,
    swap_warn_pct: t.swapWarnPct,
    swap_block_pct: t.swapBlockPct,
    iowait_warn_pct: t.iowaitWarnPct,
    iowait_block_pct: t.iowaitBlockPct,
  };
}
