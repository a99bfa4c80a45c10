// Prometheus metrics (prom-client, text exposition), all named thinimg_*. Gauges read the state DB and
// the pool when scraped; counters and histograms are fed by the command records (lib/exec.ts
// onCommandRecord) and the job runner.
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import pkg from "../../package.json" with { type: "json" };
import * as pool from "../dm/pool.ts";
import { type CmdRecord, onCommandRecord } from "../exec.ts";
import { readLastGcRun } from "../gc/last-run.ts";
import type { HealthReport } from "../health/types.ts";
import type { Ctx } from "../pool/context.ts";
import type { HealthGate } from "./health-gate.ts";
import { countJobsByState } from "./jobs.ts";

/** The label for a command record: the tool, and for dmsetup its subcommand (and pool message). */
export function commandLabel(command: string): string {
  const words = command.split(" ");
  const tool = words[0]!.split("/").at(-1)!;
  if (tool !== "dmsetup") return tool;
  const rest = words.slice(1).filter((w) => !w.startsWith("-"));
  const sub = rest[0] ?? "";
  if (sub === "message") {
    const verb = rest[3];
    return verb ? `dmsetup message ${verb}` : "dmsetup message";
  }
  return `dmsetup ${sub}`.trim();
}

const countRows = (ctx: Ctx, table: "images" | "layers" | "snapshots") =>
  ctx.db.query(`SELECT state, COUNT(*) AS n FROM ${table} WHERE pool = ? GROUP BY state`).all(ctx.cfg.pool) as { state: string; n: number }[];

const POOL_MODES = ["rw", "ro", "out_of_data_space", "fail", "error", "unavailable"] as const;

export class Metrics {
  readonly registry = new Registry();
  private lastHealth: HealthReport | null = null;
  private lastAt = 0;
  private readonly unsubscribe: () => void;
  private readonly m;

  constructor(
    private readonly ctx: Ctx,
    private readonly o: { refreshHealth?: (() => Promise<HealthReport>) | undefined; healthMaxAgeMs?: number; gate?: HealthGate } = {},
  ) {
    const registers = [this.registry];
    const gauge = <L extends string>(name: string, help: string, labelNames: L[] = []) => new Gauge<L>({ name, help, labelNames, registers });
    new Gauge({ name: "thinimg_build_info", help: "thinimg version and the pool this service manages", labelNames: ["version", "pool"], registers }).set(
      { version: pkg.version, pool: ctx.cfg.pool },
      1,
    );
    this.m = {
      cmdDuration: new Histogram({
        name: "thinimg_command_duration_seconds",
        help: "External (dm, fs) command durations by command",
        labelNames: ["command"],
        buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
        registers,
      }),
      cmdFailures: new Counter({
        name: "thinimg_command_failures_total",
        help: "Commands that exited non-zero or were killed (expected probe answers aside)",
        labelNames: ["command"],
        registers,
      }),
      cmdTimeouts: new Counter({ name: "thinimg_command_timeouts_total", help: "Commands killed at their timeout", labelNames: ["command"], registers }),
      jobDuration: new Histogram({
        name: "thinimg_job_duration_seconds",
        help: "Job run time by kind and outcome",
        labelNames: ["kind", "outcome"],
        buckets: [0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800],
        registers,
      }),
      jobs: gauge("thinimg_jobs", "Service jobs by state", ["state"]),
      poolUp: gauge("thinimg_pool_status_up", "1 when the pool's status could be read at this scrape"),
      poolUse: gauge("thinimg_pool_used_ratio", "Pool data and metadata use (0-1)", ["space"]),
      poolMode: gauge("thinimg_pool_mode", "The pool's mode (1 for the current one): rw, ro, out_of_data_space, fail, error, unavailable", ["mode"]),
      needsCheck: gauge("thinimg_pool_needs_check", "1 when the pool has needs_check set"),
      rows: Object.fromEntries(
        (["images", "layers", "snapshots"] as const).map((t) => [
          t,
          gauge(`thinimg_${t}`, `${t[0]!.toUpperCase()}${t.slice(1)} in the state DB by state`, ["state"]),
        ]),
      ) as Record<"images" | "layers" | "snapshots", Gauge<"state">>,
      health: gauge("thinimg_health_check", "Last health check results: 1 for each check's current status (ok, warn, block)", ["check", "status"]),
      healthDuration: gauge("thinimg_health_check_duration_seconds", "Duration of each check in the last run", ["check"]),
      healthy: gauge("thinimg_healthy", "1 when no health check blocks dm work (last run)"),
      healthAt: gauge("thinimg_health_last_run_timestamp_seconds", "When the health checks last ran"),
      gateAge: gauge("thinimg_preflight_probe_age_seconds", "Age of the last background pre-flight of activations and releases"),
      gatePassed: gauge("thinimg_preflight_probe_passed", "1 when the last background pre-flight passed (activations and releases may proceed on it)"),
      gateRequests: new Counter({
        name: "thinimg_preflight_requests_total",
        help: "Activations and releases by pre-flight outcome: cached (a fresh passed probe), waited (checks run in the request), refused (503)",
        labelNames: ["outcome"],
        registers,
      }),
      gcAt: gauge("thinimg_gc_last_run_timestamp_seconds", "When the last acting GC run (gc --force) started; absent before the first run"),
      gcOk: gauge("thinimg_gc_last_run_success", "1 when the last GC run needed no human"),
      gcOrphans: gauge("thinimg_gc_last_run_orphans", "Orphans the last GC run saw, by outcome", ["outcome"]),
    };
    this.unsubscribe = onCommandRecord((rec, probe) => this.onCommand(rec, probe));
  }

  /** Read the pool, the DB, the last health and GC runs into the gauges (each scrape). */
  private async refresh(): Promise<void> {
    const { ctx, m } = this;
    for (const [state, n] of Object.entries(countJobsByState(ctx.db, ctx.cfg.pool))) m.jobs.set({ state }, n);
    for (const [table, g] of Object.entries(m.rows)) {
      g.reset();
      for (const row of countRows(ctx, table as keyof typeof m.rows)) g.set({ state: row.state }, row.n);
    }
    let mode: (typeof POOL_MODES)[number] = "unavailable";
    m.poolUse.reset();
    m.needsCheck.reset();
    try {
      const st = await pool.poolStatus(ctx.cfg.pool, { timeoutMs: 5_000 });
      if (st.kind === "ok") {
        mode = st.mode;
        m.poolUse.set({ space: "data" }, st.dataUsedPct / 100);
        m.poolUse.set({ space: "metadata" }, st.metaUsedPct / 100);
        m.needsCheck.set(st.needsCheck ? 1 : 0);
      } else mode = st.kind;
      m.poolUp.set(1);
    } catch {
      m.poolUp.set(0);
    }
    for (const md of POOL_MODES) m.poolMode.set({ mode: md }, md === mode ? 1 : 0);
    await this.refreshHealth();
    this.refreshGate();
    this.refreshGc();
  }

  private async refreshHealth(): Promise<void> {
    const { m, o } = this;
    if (o.refreshHealth && (!this.lastHealth || Date.now() - this.lastAt > (o.healthMaxAgeMs ?? 30_000))) this.observeHealth(await o.refreshHealth());
    const h = this.lastHealth;
    for (const g of [m.health, m.healthDuration, m.healthy, m.healthAt]) g.reset();
    if (!h) return;
    m.healthy.set(h.healthy ? 1 : 0);
    m.healthAt.set(Math.floor(this.lastAt / 1000));
    for (const c of h.checks) {
      m.healthDuration.set({ check: c.name }, c.durationMs / 1000);
      for (const st of ["ok", "warn", "block"] as const) m.health.set({ check: c.name, status: st }, c.status === st ? 1 : 0);
    }
  }

  private readonly gateSeen = { cached: 0, waited: 0, refused: 0 };
  private refreshGate(): void {
    const { m } = this;
    const g = this.o.gate;
    if (!g) return;
    const last = g.lastProbe;
    m.gateAge.reset();
    m.gatePassed.reset();
    if (last) {
      m.gateAge.set(Math.max(0, Date.now() - last.startedAt) / 1000);
      m.gatePassed.set(last.report.healthy ? 1 : 0);
    }
    const now = { ...g.admitted, refused: g.refused };
    for (const k of ["cached", "waited", "refused"] as const) {
      m.gateRequests.inc({ outcome: k }, now[k] - this.gateSeen[k]);
      this.gateSeen[k] = now[k];
    }
  }

  private refreshGc(): void {
    const { m } = this;
    const last = readLastGcRun(this.ctx.cfg.stateDir);
    for (const g of [m.gcAt, m.gcOk, m.gcOrphans]) g.reset();
    if (!last) return;
    m.gcAt.set(Date.parse(last.started_at) / 1000);
    m.gcOk.set(last.ok ? 1 : 0);
    for (const k of ["orphans", "removed", "skipped", "failed"] as const) m.gcOrphans.set({ outcome: k === "orphans" ? "seen" : k }, last.summary[k]);
  }

  observeHealth(h: HealthReport): void {
    this.lastHealth = h;
    this.lastAt = Date.now();
  }

  onCommand(rec: CmdRecord, probe = false): void {
    const command = commandLabel(rec.command);
    this.m.cmdDuration.observe({ command }, rec.duration_ms / 1000);
    if (rec.timed_out) this.m.cmdTimeouts.inc({ command });
    if (rec.timed_out || (rec.exit_code !== 0 && !probe)) this.m.cmdFailures.inc({ command });
  }

  observeJob(kind: string, outcome: string, ms: number): void {
    this.m.jobDuration.observe({ kind, outcome }, ms / 1000);
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  async render(): Promise<string> {
    await this.refresh();
    return this.registry.metrics();
  }

  close(): void {
    this.unsubscribe();
  }
}
