// The service's pre-flight for activations and releases. A long-running service keeps the full
// pre-flight fresh instead of running it inside every request: a background probe runs the same
// checks (the same per-check timeouts, the state dir's kernel-log cursor) every `periodMs`, and again
// right after each dm operation the service makes. A request proceeds only when the last probe
// passed and started at most `maxAgeMs` ago. Fail closed:
//   - the last probe blocked (and is within the bound) → the request is refused (503) with its reason;
//   - no probe yet, or the last one is older than the bound → the request waits for a probe now
//     (joining one in flight), exactly like the synchronous pre-flight.
// One probe at a time: the timer, a refresh and a waiting request all share the one in flight.
import { errorMessage } from "../errors.ts";
import { assertReport } from "../health/run.ts";
import { RUNBOOK } from "../health/runbook.ts";
import { type HealthReport, result } from "../health/types.ts";
import { log } from "../log.ts";

export const DEFAULT_HEALTH_MAX_AGE_MS = 5_000;
export const DEFAULT_HEALTH_PERIOD_MS = 2_000;
/** How long after a dm operation its probe starts (see refresh()). */
export const REFRESH_DELAY_MS = 50;

export interface HealthGateOptions {
  /** The full pre-flight checks (runHealthChecks with the pipeline's settings). */
  check: () => Promise<HealthReport>;
  /** A request proceeds on a passed probe that started at most this long ago. */
  maxAgeMs?: number;
  /** The background probe runs when the last one is this old (0: no timer; refreshes only). */
  periodMs?: number;
  /** Clock (unit tests). */
  now?: () => number;
}

export interface Probe {
  report: HealthReport;
  /** When the checks started reading: a probe's age counts from here. */
  startedAt: number;
}

/** How a request was admitted: on the background probe, or on one it waited for. */
export type Admission = "cached" | "waited";

export class HealthGate {
  readonly maxAgeMs: number;
  readonly periodMs: number;
  private readonly now: () => number;
  private last: Probe | null = null;
  private inflight: Promise<Probe> | null = null;
  private timer: ReturnType<typeof setInterval> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private stopped = false;
  private warned = "";
  /** Probes started so far, and requests admitted each way (diagnostics, the benchmark). */
  probes = 0;
  readonly admitted: Record<Admission, number> = { cached: 0, waited: 0 };
  /** Requests refused (a blocking probe). */
  refused = 0;

  constructor(private readonly o: HealthGateOptions) {
    this.maxAgeMs = o.maxAgeMs ?? DEFAULT_HEALTH_MAX_AGE_MS;
    this.periodMs = o.periodMs ?? DEFAULT_HEALTH_PERIOD_MS;
    this.now = o.now ?? Date.now;
  }

  /** The last finished probe, if any. */
  get lastProbe(): Probe | null {
    return this.last;
  }

  /** Run the checks now, or join the probe already running. Never rejects. */
  probe(): Promise<Probe> {
    if (this.inflight) return this.inflight;
    this.probes++;
    const startedAt = this.now();
    const p = this.o
      .check()
      .catch((e: unknown) => failedReport(e))
      .then((report) => {
        const probe = { report, startedAt };
        // a slower probe never replaces the result of one that started later
        if (!this.last || this.last.startedAt <= startedAt) this.last = probe;
        this.note(report);
        return probe;
      })
      .finally(() => {
        this.inflight = null;
      });
    this.inflight = p;
    return p;
  }

  /** After a dm operation: start a probe in the background (or let the running one stand), a moment
   * later (REFRESH_DELAY_MS): its first reads and its spawn are tens of ms of synchronous work on the
   * event loop (in the VM), which the answer to the request, and its client's read of it when the
   * client shares the process, should not wait behind. */
  refresh(): void {
    if (this.refreshTimer || this.stopped) return;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      void this.probe();
    }, REFRESH_DELAY_MS);
  }

  /** The pre-flight: resolves when a passed probe no older than maxAgeMs admits the request; throws
   * ThinimgError("unhealthy") (503) with the blocking check's reason and runbook otherwise. */
  async admit(): Promise<Admission> {
    const cached = this.last;
    const how: Admission = cached && this.now() - cached.startedAt <= this.maxAgeMs ? "cached" : "waited";
    const report = how === "cached" ? cached!.report : (await this.probe()).report;
    try {
      assertReport(report);
    } catch (e) {
      this.refused++;
      throw e;
    }
    this.admitted[how]++;
    return how;
  }

  /** Probe now and then every periodMs (a tick finding a probe younger than periodMs skips). */
  start(): void {
    this.refresh();
    if (this.periodMs <= 0 || this.timer) return;
    this.timer = setInterval(
      () => {
        const last = this.last;
        if (!this.inflight && (!last || this.now() - last.startedAt >= this.periodMs)) this.refresh();
      },
      Math.max(50, Math.floor(this.periodMs / 4)),
    );
    this.timer.unref();
  }

  /** Resolves when no probe is running (starts none). */
  async settled(): Promise<void> {
    while (this.inflight || this.refreshTimer) await (this.inflight ?? Bun.sleep(1));
  }

  /** Stop the timer and the refreshes, and wait for a probe in flight (it is bounded by the checks' timeouts). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.timer = null;
    this.refreshTimer = null;
    if (this.inflight) await this.inflight;
  }

  /** Log a change of verdict or warnings once, not on every probe. */
  private note(report: HealthReport): void {
    const blocking = report.checks.filter((c) => c.status === "block");
    const warns = report.checks.filter((c) => c.status === "warn");
    const key = [...blocking, ...warns].map((c) => `${c.status} ${c.name}: ${c.message}`).join("\n");
    if (key === this.warned) return;
    const wasBlocked = this.warned.startsWith("block");
    this.warned = key;
    for (const c of blocking) log.warn(`health: ${c.name} blocks activations and releases: ${c.message}`);
    for (const c of warns) log.warn(`health: ${c.name}: ${c.message}`);
    if (wasBlocked && blocking.length === 0) log.info("health: the pre-flight checks pass again");
  }
}

function failedReport(e: unknown): HealthReport {
  return {
    healthy: false,
    pool: null,
    checks: [result("preflight", "block", `the health checks failed: ${errorMessage(e)}`, RUNBOOK.timeout)],
    durationMs: 0,
  };
}
