// The long-running service: one process per host and pool. startService() is its whole start-up
// (service lock, job recovery, runner, HTTP server); stop() is the SIGTERM path: answer 503, let the
// running job or in-flight dm command finish within the drain time, record an unfinished job as
// interrupted (it is queued again on the next start), and never clean up dm state.
import { existsSync, lstatSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import type { Server } from "bun";
import type { Config } from "../config.ts";
import { ThinimgError, usageError } from "../errors.ts";
import { liveChildGroups } from "../exec.ts";
import { runHealthChecks } from "../health/run.ts";
import { releaseLingeringHolds } from "../lock/holders.ts";
import { tryAcquireNamed } from "../lock/named-lock.ts";
import { describeHolder } from "../lock/owner.ts";
import { log } from "../log.ts";
import { activate, release } from "../pipeline/activate.ts";
import { preflightOptions } from "../pipeline/preflight.ts";
import { prune } from "../pipeline/prune.ts";
import { reattachAll, renderReattach } from "../pipeline/reattach.ts";
import { removeImages } from "../pipeline/remove.ts";
import { resolveOptions, unpack } from "../pipeline/unpack.ts";
import { asHolder, type Ctx, makeCtx } from "../pool/context.ts";
import { serviceLockKey } from "../store/keys.ts";
import { deleteLockRow } from "../store/locks.ts";
import { type AllowList, makeAllowList } from "./allow.ts";
import { ReplayCache, readSecretFile, type Secrets } from "./auth.ts";
import { HealthGate } from "./health-gate.ts";
import { type JobRow, pruneJobs, requeueInterrupted } from "./jobs.ts";
import { formatListen, isLocalOnly, type Listen } from "./listen.ts";
import { Metrics } from "./metrics.ts";
import { makeApp, type ServiceOps } from "./routes.ts";
import { JobRunner } from "./runner.ts";

export const DEFAULT_RETENTION_MS = 7 * 24 * 3_600_000;
export const DEFAULT_DRAIN_MS = 60_000;
const PRUNE_EVERY_MS = 3_600_000;
const ACTIVATION_GRACE_MS = 30_000;

/** Where /readyz and the metrics keep their own kernel-log cursor: the pre-flight checks before dm
 * work keep theirs in the state dir, and a poll must never consume the kernel errors they are
 * there to see. */
export const serviceHealthDir = (stateDir: string) => join(stateDir, "service-health");

/** How long the service keeps its shared hold of the state dir after its last operation: requests
 * in a burst join it instead of taking the holder file each time. A gc --force or recover-pool that
 * starts waiting meanwhile gets it within 0.1 s (lib/lock/holders.ts). */
export const HOLD_LINGER_MS = 10_000;
const held = <T>(ctx: Ctx, fn: () => Promise<T>) => asHolder(ctx, fn, { lingerMs: HOLD_LINGER_MS });

/** The pipeline itself: what the service runs outside of unit tests. */
/** Each operation is a shared holder of the state dir for its run (a service idle for
 * HOLD_LINGER_MS holds nothing; gc --force and recover-pool can act between jobs). */
export const pipelineOps: ServiceOps = {
  unpack: (ctx, o) => held(ctx, () => unpack(ctx, o)),
  activate: (ctx, image, o) => held(ctx, () => activate(ctx, image, { size: o.sizeBytes, preflight: o.preflight })),
  async prefetch(ctx, o) {
    const { resolveImage } = await import("../image/resolve.ts");
    await resolveImage(o.source, resolveOptions(ctx, o));
  },
  release: (ctx, ref, o) => held(ctx, () => release(ctx, ref, { preflight: o?.preflight })),
  remove: (ctx, refs) => held(ctx, () => removeImages(ctx, refs)),
  prune: (ctx, o) => held(ctx, () => prune(ctx, o)),
  reattach: (ctx) => held(ctx, () => reattachAll(ctx)),
  health: (ctx) => runHealthChecks({ pool: ctx.cfg.pool, stateDir: serviceHealthDir(ctx.cfg.stateDir) }),
  preflightChecks: (ctx) => runHealthChecks(preflightOptions(ctx)),
};

export interface ServiceOptions {
  cfg: Config;
  listen: Listen;
  secretFile?: string | undefined;
  tokenFile?: string | undefined;
  insecureNoAuth?: boolean;
  allowSources: string[];
  retentionMs?: number;
  /** How long SIGTERM waits for the running job before interrupting it (between two commands). */
  drainMs?: number;
  /** Queued jobs whose downloads may run ahead of the running one (default 1). */
  prefetch?: number;
  /** Activations and releases proceed on a passed background pre-flight at most this old (ms). */
  healthMaxAgeMs?: number;
  /** The background pre-flight's period (ms; 0: only after each dm operation). */
  healthPeriodMs?: number;
  ops?: ServiceOps;
}

export interface Service {
  /** http://host:port or unix:/path */
  url: string;
  port: number | null;
  ctx: Ctx;
  runner: JobRunner;
  /** The pre-flight of activations and releases (its last probe, how many ran). */
  gate: HealthGate;
  /** Re-read the secret and token files (SIGHUP); keeps the old ones when a file is unreadable. */
  reloadSecrets(): void;
  /** Stop: 503 from now on, drain, interrupt what is left; resolves with the interrupted job. */
  stop(): Promise<{ interrupted: JobRow | null }>;
}

function loadSecrets(o: ServiceOptions): Secrets | null {
  if (o.insecureNoAuth) return null;
  return {
    hmac: o.secretFile ? readSecretFile(o.secretFile, "secret") : null,
    bearer: o.tokenFile ? readSecretFile(o.tokenFile, "token") : null,
  };
}

function checkAuthOptions(o: ServiceOptions): void {
  if (o.insecureNoAuth) {
    if (o.secretFile || o.tokenFile) throw usageError("--insecure-no-auth cannot be combined with --secret-file or --token-file");
    if (!isLocalOnly(o.listen)) {
      throw usageError(
        `--insecure-no-auth listens only on loopback or a unix socket, not ${formatListen(o.listen)}`,
        "give --secret-file FILE, or --listen 127.0.0.1:PORT",
      );
    }
  } else if (!o.secretFile && !o.tokenFile) {
    throw usageError("--secret-file is required", "create one with `openssl rand -hex 32 > /etc/thinimg/secret` (or run a local test with --insecure-no-auth)");
  }
}

/** One service per pool and state dir: a named lock held for the process's life. */
function takeServiceLock(ctx: Ctx): string {
  const key = serviceLockKey(ctx.cfg.pool);
  const r = tryAcquireNamed(ctx.db, key, ctx.owner.command);
  if (!r.ok) {
    throw new ThinimgError("conflict", `another thinimg service runs for pool ${ctx.cfg.pool}: ${describeHolder(r.holder)}`, {
      hint: "stop it first (systemctl stop thinimg), or use another --pool / --state-dir",
    });
  }
  return key;
}

function serve(listen: Listen, fetch: (req: Request) => Promise<Response>): Server<undefined> {
  if (listen.kind === "unix") {
    // a socket left by a dead service (we hold the service lock, so no live one owns it)
    if (existsSync(listen.path) && lstatSync(listen.path).isSocket()) unlinkSync(listen.path);
    return Bun.serve({ unix: listen.path, fetch });
  }
  return Bun.serve({ hostname: listen.host, port: listen.port, fetch });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function startService(o: ServiceOptions): Promise<Service> {
  checkAuthOptions(o);
  const secrets = loadSecrets(o);
  const allow = makeAllowList(o.allowSources);
  const ops = o.ops ?? pipelineOps;
  const ctx = makeCtx(o.cfg, { command: "thinimg serve" });
  const lockKey = takeServiceLock(ctx);
  try {
    return await startLocked(o, ctx, lockKey, secrets, allow, ops);
  } catch (e) {
    deleteLockRow(ctx.db, lockKey, ctx.owner.pid, ctx.owner.startTime);
    ctx.db.close();
    throw e;
  }
}

/** Before the first request: interrupted jobs queued again, finished ones past retention pruned,
 * handed-out snapshots' devices back. */
async function prepareStart(ctx: Ctx, ops: ServiceOps, retentionMs: number): Promise<void> {
  const requeued = requeueInterrupted(ctx.db, ctx.cfg.pool);
  if (requeued) log.info(`resuming ${requeued} interrupted job(s)`);
  const pruned = pruneJobs(ctx.db, ctx.cfg.pool, retentionMs);
  if (pruned) log.info(`pruned ${pruned} finished job(s) past the retention period`);
  // before the first request: a handed-out snapshot's device is back (the boot runbook did it already,
  // unless it was skipped); a failure is logged and the service still starts (/readyz says why)
  const re = await ops.reattach(ctx);
  if (!re.ok || re.summary.reattached > 0) for (const line of renderReattach(re)) (re.ok ? log.info : log.warn)(line);
}

/** The running service's request state: draining refuses new /v1 requests; inflight counts the answers owed. */
interface Serving {
  draining: boolean;
  inflight: number;
}

/** Drain (the runner, then the requests in flight, then the dm commands), then release everything. */
async function stopService(
  o: ServiceOptions,
  ctx: Ctx,
  lockKey: string,
  st: Serving,
  p: { runner: JobRunner; gate: HealthGate; metrics: Metrics; server: Server<undefined>; pruneTimer: ReturnType<typeof setInterval> },
): Promise<{ interrupted: JobRow | null }> {
  const { runner, gate, metrics, server, pruneTimer } = p;
  st.draining = true;
  const drainMs = o.drainMs ?? DEFAULT_DRAIN_MS;
  // an activation or release in flight is short: let it answer even with a short drain time
  const deadline = Date.now() + Math.max(drainMs, ACTIVATION_GRACE_MS);
  const loopDone = runner.stop().then(() => true);
  const finished = await Promise.race([loopDone, sleep(drainMs).then(() => false)]);
  while (st.inflight > 0 && Date.now() < deadline) await sleep(20);
  // never kill a dm command: each one ends within its own timeout
  while (liveChildGroups().length > 0) await sleep(20);
  const interrupted = finished ? null : runner.interruptRunning();
  if (interrupted) log.warn(`job ${interrupted.id} (${interrupted.image}) interrupted; it resumes on the next start`);
  clearInterval(pruneTimer);
  await gate.stop();
  await releaseLingeringHolds();
  server.stop(true);
  metrics.close();
  deleteLockRow(ctx.db, lockKey, ctx.owner.pid, ctx.owner.startTime);
  if (!interrupted && st.inflight === 0) ctx.db.close();
  return { interrupted };
}

async function startLocked(o: ServiceOptions, ctx: Ctx, lockKey: string, initialSecrets: Secrets | null, allow: AllowList, ops: ServiceOps): Promise<Service> {
  let secrets = initialSecrets;
  const retentionMs = o.retentionMs ?? DEFAULT_RETENTION_MS;
  await prepareStart(ctx, ops, retentionMs);

  const gate = new HealthGate({ check: () => ops.preflightChecks(ctx), maxAgeMs: o.healthMaxAgeMs, periodMs: o.healthPeriodMs });
  const metrics = new Metrics(ctx, { refreshHealth: () => ops.health(ctx), gate });
  const runner = new JobRunner(
    ctx,
    ops,
    {
      onFinish(job, state, ms) {
        metrics.observeJob(job.kind, state, ms);
        gate.refresh();
        pruneJobs(ctx.db, ctx.cfg.pool, retentionMs);
      },
    },
    { prefetch: o.prefetch ?? 1 },
  );
  const st: Serving = { draining: false, inflight: 0 };
  const app = makeApp({ ctx, ops, runner, allow, secrets: () => secrets, replay: new ReplayCache(), draining: () => st.draining, metrics, gate });
  gate.start(); // the first probe runs while the server comes up
  const server = serve(o.listen, async (req) => {
    st.inflight++;
    try {
      return await app.fetch(req);
    } finally {
      st.inflight--;
    }
  });
  const pruneTimer = setInterval(() => pruneJobs(ctx.db, ctx.cfg.pool, retentionMs), PRUNE_EVERY_MS);
  pruneTimer.unref();
  runner.start();
  const url = o.listen.kind === "unix" ? `unix:${o.listen.path}` : `http://${formatListen(o.listen, server.port)}`;
  if (!secrets) log.warn(`*** --insecure-no-auth: every local process can unpack, activate and release on pool ${ctx.cfg.pool} through ${url} ***`);
  log.info(`thinimg service on ${url} (pool ${ctx.cfg.pool}, state ${ctx.cfg.stateDir}, ${allow.prefixes.length} allowed source prefix(es))`);

  let stopped: Promise<{ interrupted: JobRow | null }> | null = null;
  const stop = () => stopService(o, ctx, lockKey, st, { runner, gate, metrics, server, pruneTimer });
  return {
    url,
    port: o.listen.kind === "tcp" ? (server.port ?? null) : null,
    ctx,
    runner,
    gate,
    reloadSecrets() {
      try {
        secrets = loadSecrets(o);
        log.info("secrets re-read");
      } catch (e) {
        log.error(`keeping the previous secrets: ${e instanceof ThinimgError ? e.oneLine() : String(e)}`);
      }
    },
    stop() {
      stopped ??= stop();
      return stopped;
    },
  };
}
