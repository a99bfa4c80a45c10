// The HTTP face of thinimg (hono): /v1/* (authenticated: unpack jobs, activate, release, images),
// /healthz, /readyz, /metrics. Every operation is the pipeline's own (through ServiceOps); every error
// is the CLI's envelope with a status from lib/server/http-error.ts.
import { type Context, Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import * as v from "valibot";
import { cut, quoted, ThinimgError } from "../errors.ts";
import { type HealthReport, reportJson } from "../health/types.ts";
import { log } from "../log.ts";
import { type ActivateResult, findImage, findSnapshot, type ReleaseResult } from "../pipeline/activate.ts";
import { imageJson, iso } from "../pipeline/inventory.ts";
import type { Preflight } from "../pipeline/preflight.ts";
import type { PruneOptions, PruneResult } from "../pipeline/prune.ts";
import type { ReattachAllReport } from "../pipeline/reattach.ts";
import type { RemoveResult } from "../pipeline/remove.ts";
import { defaultImageName } from "../pipeline/unpack.ts";
import type { Ctx } from "../pool/context.ts";
import { assertImageName } from "../pool/names.ts";
import { listImages } from "../store/images.ts";
import { parseDuration, parseSize } from "../util/units.ts";
import { type AllowList, admitSource } from "./allow.ts";
import { authenticate, type ReplayCache, type Secrets } from "./auth.ts";
import type { HealthGate } from "./health-gate.ts";
import { errorResponse, HttpError } from "./http-error.ts";
import { enqueueUnpack, getJob, JOB_STATES, type JobRow, type JobState, listJobs } from "./jobs.ts";
import type { Metrics } from "./metrics.ts";
import type { JobOps, JobRunner } from "./runner.ts";

export const MAX_BODY_BYTES = 64 * 1024;

export interface ServiceOps extends JobOps {
  /** preflight: run before the dm work, in place of the synchronous checks (the service's gate). */
  activate(ctx: Ctx, image: string, o: { sizeBytes?: number | undefined; preflight?: Preflight | undefined }): Promise<ActivateResult>;
  release(ctx: Ctx, ref: string, o?: { preflight?: Preflight | undefined }): Promise<ReleaseResult>;
  /** /readyz and the metrics (their own kernel-log cursor). */
  health(ctx: Ctx): Promise<HealthReport>;
  /** The full pre-flight checks, as before dm work (the state dir's cursor): the gate's probe. */
  preflightChecks(ctx: Ctx): Promise<HealthReport>;
  remove(ctx: Ctx, refs: string[]): Promise<RemoveResult>;
  prune(ctx: Ctx, o: PruneOptions): Promise<PruneResult>;
  /** At start-up: every handed-out snapshot whose device is not loaded (a reboot) gets it back. */
  reattach(ctx: Ctx): Promise<ReattachAllReport>;
}

export interface AppDeps {
  ctx: Ctx;
  ops: ServiceOps;
  runner: JobRunner;
  allow: AllowList;
  /** Current secrets (re-read on SIGHUP); null: --insecure-no-auth. */
  secrets(): Secrets | null;
  replay: ReplayCache;
  draining(): boolean;
  metrics: Metrics;
  /** The pre-flight of activations and releases (lib/server/health-gate.ts). */
  gate: HealthGate;
}

type Env = { Variables: { body: Uint8Array } };

export function jobJson(j: JobRow, runner: JobRunner) {
  const progress = j.state === "running" ? runner.progressOf(j.id) : null;
  return {
    id: j.id,
    kind: j.kind,
    state: j.state,
    image: j.image,
    source: j.source,
    attempts: j.attempts,
    created_at: iso(j.created_at),
    started_at: iso(j.started_at),
    finished_at: iso(j.finished_at),
    ...(j.error_kind ? { error: { kind: j.error_kind, message: j.error_message, hint: j.error_hint } } : {}),
    ...(j.result ? { result: JSON.parse(j.result) as unknown } : {}),
    ...(progress ? { progress } : {}),
  };
}

const UnpackBody = v.strictObject({
  source: v.pipe(v.string(), v.minLength(1), v.maxLength(4096)),
  name: v.optional(v.pipe(v.string(), v.maxLength(255))),
  platform: v.optional(v.pipe(v.string(), v.regex(/^[a-z0-9]+\/[a-z0-9_]+(\/[a-z0-9]+)?$/, "use os/arch[/variant], e.g. linux/amd64"))),
  refresh: v.optional(v.boolean()),
});
const ActivateBody = v.strictObject({
  image: v.pipe(v.string(), v.minLength(1), v.maxLength(255)),
  size: v.optional(v.pipe(v.string(), v.maxLength(32))),
});
const ReleaseBody = v.strictObject({
  snapshot: v.union([v.pipe(v.number(), v.integer(), v.minValue(1)), v.pipe(v.string(), v.minLength(1), v.maxLength(255))]),
});

const DeleteBody = v.strictObject({ image: v.pipe(v.string(), v.minLength(1), v.maxLength(255)) });
const PruneBody = v.strictObject({
  unused_for: v.optional(v.pipe(v.string(), v.minLength(1), v.maxLength(32))),
  keep_last: v.optional(v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(1_000_000))),
  dry_run: v.optional(v.boolean()),
});

function parseBody<S extends v.GenericSchema>(c: Context<Env>, schema: S): v.InferOutput<S> {
  const text = new TextDecoder().decode(c.get("body"));
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new ThinimgError("input", `the request body is not JSON: ${(e as Error).message}`, {
      hint: "send a JSON object with Content-Type: application/json",
    });
  }
  const r = v.safeParse(schema, data);
  if (!r.success) {
    const issue = r.issues[0];
    const path = v.getDotPath(issue);
    throw new ThinimgError("input", `invalid request body: ${path ? `${path}: ` : ""}${issue.message}`, {
      hint: "see docs/ops-service.md for the request fields",
    });
  }
  return r.output;
}

/** An operation whose pre-flight is the gate; the health is probed again once it is done. */
async function gated<T>(d: AppDeps, op: (preflight: Preflight) => Promise<T>): Promise<T> {
  try {
    return await op(async () => {
      await d.gate.admit();
    });
  } finally {
    d.gate.refresh();
  }
}

/** /v1/*: every route refuses while draining, bounds its body, and authenticates it. */
function v1(app: Hono<Env>, d: AppDeps): void {
  app.use("/v1/*", async (_c, next) => {
    if (d.draining()) throw new HttpError(503, "conflict", "the service is stopping", "retry against the restarted service");
    await next();
  });
  app.use(
    "/v1/*",
    bodyLimit({
      maxSize: MAX_BODY_BYTES,
      onError: () => {
        throw new HttpError(413, "input", `the request body is over ${MAX_BODY_BYTES / 1024} KiB`, "send a smaller JSON object");
      },
    }),
  );
  app.use("/v1/*", async (c, next) => {
    const body = new Uint8Array(await c.req.arrayBuffer());
    c.set("body", body);
    const secrets = d.secrets();
    if (secrets) authenticate({ method: c.req.method, header: (n) => c.req.header(n), body }, secrets, d.replay);
    await next();
  });

  v1Jobs(app, d);
  v1Snapshots(app, d);
  v1Images(app, d);
}

/** POST /v1/unpack (a queued job), GET /v1/jobs/:id, GET /v1/jobs. */
function v1Jobs(app: Hono<Env>, d: AppDeps): void {
  app.post("/v1/unpack", (c) => {
    const b = parseBody(c, UnpackBody);
    const source = admitSource(b.source, d.allow);
    const image = assertImageName(b.name ?? defaultImageName(source));
    const r = enqueueUnpack(d.ctx.db, { pool: d.ctx.cfg.pool, image, source, params: { platform: b.platform, refresh: b.refresh } });
    if (r.created) {
      log.info(`job ${r.job.id}: queued unpack of ${image} from ${source}`);
      d.runner.wake();
      return c.json({ ok: true, job: jobJson(r.job, d.runner) }, 202);
    }
    if (r.job.source !== source) {
      throw new ThinimgError("conflict", `image ${image} is already being unpacked from ${r.job.source} (job ${r.job.id})`, {
        hint: "wait for that job, or choose another name",
      });
    }
    return c.json({ ok: true, job: jobJson(r.job, d.runner) }, 200);
  });

  app.get("/v1/jobs/:id", (c) => {
    const id = c.req.param("id");
    const job = /^\d{1,15}$/.test(id) ? getJob(d.ctx.db, Number(id)) : null;
    if (!job || job.pool !== d.ctx.cfg.pool)
      throw new HttpError(404, "missing", `no job ${quoted(id)}`, "jobs are pruned after the retention period; GET /v1/jobs lists them");
    return c.json({ ok: true, job: jobJson(job, d.runner) });
  });

  app.get("/v1/jobs", (c) => {
    const state = c.req.query("state");
    if (state !== undefined && !JOB_STATES.includes(state as JobState)) {
      throw new ThinimgError("usage", `unknown job state ${quoted(state)}`, { hint: `use one of ${JOB_STATES.join(", ")}` });
    }
    const jobs = listJobs(d.ctx.db, d.ctx.cfg.pool, { state: state as JobState | undefined });
    return c.json({ ok: true, jobs: jobs.map((j) => jobJson(j, d.runner)) });
  });
}

/** POST /v1/activate, POST /v1/release (their pre-flight is the health gate). */
function v1Snapshots(app: Hono<Env>, d: AppDeps): void {
  app.post("/v1/activate", async (c) => {
    const b = parseBody(c, ActivateBody);
    const sizeBytes = b.size === undefined ? undefined : parseSize(b.size, "size");
    try {
      findImage(d.ctx, b.image);
    } catch (e) {
      if (e instanceof ThinimgError) throw new HttpError(404, "missing", e.message, e.hint);
      throw e;
    }
    const r = await gated(d, (preflight) => d.ops.activate(d.ctx, b.image, { sizeBytes, preflight }));
    return c.json({
      ok: true,
      snapshot: { id: r.snapshot_id, device: r.device_path, device_name: r.device_name, image: r.image, thin_id: r.thin_id, duration_ms: r.duration_ms },
    });
  });

  app.post("/v1/release", async (c) => {
    const b = parseBody(c, ReleaseBody);
    try {
      findSnapshot(d.ctx, String(b.snapshot));
    } catch (e) {
      if (e instanceof ThinimgError) throw new HttpError(404, "missing", e.message, e.hint);
      throw e;
    }
    const r = await gated(d, (preflight) => d.ops.release(d.ctx, String(b.snapshot), { preflight }));
    return c.json({ ok: true, snapshot: { id: r.snapshot_id, device_name: r.device_name, state: r.state, duration_ms: r.duration_ms } });
  });
}

/** DELETE /v1/images/:name, POST /v1/prune, GET /v1/images. */
function v1Images(app: Hono<Env>, d: AppDeps): void {
  app.delete("/v1/images/:name", async (c) => {
    const name = c.req.param("name");
    // the signature covers the body, not the path: a body naming the image binds it (and keeps two
    // deletes in one second from looking like a replay)
    const named = c.get("body").length > 0 ? parseBody(c, DeleteBody).image : name;
    if (named !== name) {
      throw new ThinimgError("input", `invalid request body: image ${quoted(named)} is not the one in the path (${quoted(name)})`, {
        hint: 'send {"image": NAME} for DELETE /v1/images/NAME, or no body',
      });
    }
    try {
      findImage(d.ctx, name);
    } catch (e) {
      if (e instanceof ThinimgError) throw new HttpError(404, "missing", e.message, e.hint);
      throw e;
    }
    return c.json({ ok: true, ...(await d.ops.remove(d.ctx, [name])) });
  });

  app.post("/v1/prune", async (c) => {
    const b = parseBody(c, PruneBody);
    if (b.unused_for === undefined && b.keep_last === undefined) {
      throw new ThinimgError("input", "invalid request body: give unused_for, keep_last or both", { hint: 'e.g. {"unused_for": "7d", "keep_last": 2}' });
    }
    const unusedForMs = b.unused_for === undefined ? null : parseDuration(b.unused_for, "unused_for", { unit: "required" });
    return c.json({ ok: true, ...(await d.ops.prune(d.ctx, { unusedForMs, keepLast: b.keep_last ?? null, dryRun: b.dry_run === true })) });
  });

  app.get("/v1/images", (c) => {
    const images = listImages(d.ctx.db, d.ctx.cfg.pool)
      .filter((i) => !i.removed_at)
      .map((i) => imageJson(d.ctx.db, i));
    return c.json({ ok: true, images });
  });
}

export function makeApp(d: AppDeps): Hono<Env> {
  const app = new Hono<Env>();
  app.onError((e, c) => {
    const r = errorResponse(e);
    const line = `${c.req.method} ${cut(c.req.path, 200)}: ${r.status} ${r.body.error.message}`;
    if (r.status >= 500 && !(e instanceof ThinimgError)) log.error(e);
    else if (r.status >= 500) log.warn(line);
    else log.info(line);
    return c.json(r.body, r.status as 400);
  });
  app.notFound(() => {
    throw new HttpError(404, "missing", "no such endpoint", "see docs/ops-service.md for the API");
  });

  app.get("/healthz", (c) => c.json({ ok: true, draining: d.draining() }));
  app.get("/readyz", async (c) => {
    if (d.draining()) throw new HttpError(503, "conflict", "the service is stopping", "retry against the restarted service");
    const report = await d.ops.health(d.ctx);
    d.metrics.observeHealth(report);
    return c.json({ ok: report.healthy, ...reportJson(report) }, report.healthy ? 200 : 503);
  });
  app.get("/metrics", async (c) => {
    const text = await d.metrics.render();
    return c.body(text, 200, { "content-type": d.metrics.contentType });
  });
  v1(app, d);
  return app;
}
