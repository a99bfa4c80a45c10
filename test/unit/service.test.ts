// The service over real HTTP on 127.0.0.1 with a real SQLite state dir: authentication (HMAC,
// timestamps, replay, bearer), the body limit, body validation, the source allow-list, job dedupe under
// concurrency, restarts with queued and interrupted jobs, draining, metrics. The pipeline operations
// are injected (the runner takes them as a parameter); test/vm/service.test.ts runs the real ones.
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { ThinimgError } from "../../lib/errors.ts";
import type { HealthReport } from "../../lib/health/types.ts";
import type { ReattachAllReport } from "../../lib/pipeline/reattach.ts";
import type { UnpackOptions, UnpackResult } from "../../lib/pipeline/unpack.ts";
import { admitSource, makeAllowList } from "../../lib/server/allow.ts";
import { sign } from "../../lib/server/auth.ts";
import { claimNextJob, enqueueUnpack, finishJob, getJob, pruneJobs } from "../../lib/server/jobs.ts";
import { parseListen } from "../../lib/server/listen.ts";
import { commandLabel } from "../../lib/server/metrics.ts";
import type { ServiceOps } from "../../lib/server/routes.ts";
import { pipelineOps, type Service, type ServiceOptions, startService } from "../../lib/server/service.ts";
import { openDb } from "../../lib/store/db.ts";
import { beginImage, markImageReady } from "../../lib/store/images.ts";

const W = mkdtempSync("/tmp/thinimg-service-unit-");
const SECRET = "0123456789abcdef0123456789abcdef";
const TOKEN = "token-token-token-token-token-42";
writeFileSync(join(W, "secret"), `${SECRET}\n`);
writeFileSync(join(W, "token"), `${TOKEN}\n`);
const running: Service[] = [];
afterEach(async () => {
  for (const s of running.splice(0)) await s.stop();
});
afterAll(() => rmSync(W, { recursive: true, force: true }));

/** Fake pipeline: records every unpack; each one waits for its gate (open by default). */
function fakeOps(o: { gated?: boolean } = {}) {
  const calls: string[] = [];
  const prefetched: string[] = [];
  let reattached = 0;
  let gate = Promise.withResolvers<void>();
  if (!o.gated) gate.resolve();
  const ops: ServiceOps = {
    async unpack(_ctx, u: UnpackOptions): Promise<UnpackResult> {
      calls.push(u.name!);
      await gate.promise;
      if (u.source.includes("broken")) throw new ThinimgError("input", `${u.source}: the image has no layers`, { hint: "check the source" });
      return {
        image: { id: calls.length, name: u.name!, source: u.source, format: "layer-family", state: "ready" },
        layers: [{ index: 0, chain_id: "sha256:aa", thin_id: 1, device_name: "thinimg-p-layer-1", reused: false, stats: null }],
        built: 1,
        reused: 0,
        dm_work: true,
        waited: false,
        duration_ms: 1,
      };
    },
    async prefetch(_ctx, u: UnpackOptions) {
      prefetched.push(u.name!);
    },
    async activate() {
      throw new ThinimgError("dm", "no kernel in unit tests");
    },
    async release() {
      throw new ThinimgError("dm", "no kernel in unit tests");
    },
    // DB-only operations: the real ones, on the service's own state DB
    remove: pipelineOps.remove,
    prune: pipelineOps.prune,
    async reattach(ctx): Promise<ReattachAllReport> {
      reattached++;
      return {
        ok: true,
        pool: ctx.cfg.pool,
        dry_run: false,
        skipped: null,
        snapshots: [],
        error: null,
        summary: { active: 0, reattached: 0, already_attached: 0, failed: 0, not_run: 0 },
      };
    },
    async health(ctx): Promise<HealthReport> {
      return { healthy: true, pool: ctx.cfg.pool, checks: [{ name: "host.memory", status: "ok", message: "fine", runbook: "", durationMs: 1 }], durationMs: 1 };
    },
    async preflightChecks(ctx): Promise<HealthReport> {
      return { healthy: true, pool: ctx.cfg.pool, checks: [{ name: "host.memory", status: "ok", message: "fine", runbook: "", durationMs: 1 }], durationMs: 1 };
    },
  };
  return {
    ops,
    calls,
    prefetched,
    reattached: () => reattached,
    open: () => gate.resolve(),
    close: () => {
      gate = Promise.withResolvers<void>();
    },
  };
}

let n = 0;
async function start(o: Partial<ServiceOptions> & { ops: ServiceOps; stateDir?: string }): Promise<Service> {
  const stateDir = o.stateDir ?? join(W, `state-${++n}`);
  const cfg = loadConfig({ stateDir, pool: "unitpool" }, {});
  const s = await startService({
    cfg,
    listen: parseListen("127.0.0.1:0"),
    secretFile: join(W, "secret"),
    allowSources: ["s3://images-bucket/", "https://registry.example/images/"],
    drainMs: 5_000,
    ...o,
  });
  running.push(s);
  return s;
}

function signed(body: string, o: { ts?: number; secret?: string } = {}): Record<string, string> {
  const ts = String(o.ts ?? Math.floor(Date.now() / 1000));
  return { "content-type": "application/json", "x-thinimg-timestamp": ts, "x-thinimg-signature": `sha256=${sign(o.secret ?? SECRET, ts, body)}` };
}

async function call(s: Service, method: string, path: string, body?: unknown, headers?: Record<string, string>) {
  const text = body === undefined ? "" : typeof body === "string" ? body : JSON.stringify(body);
  const res = await fetch(`${s.url}${path}`, { method, body: method === "GET" ? undefined : text, headers: headers ?? signed(text) });
  const out = res.headers.get("content-type")?.includes("json") ? await res.json() : await res.text();
  // biome-ignore lint/suspicious/noExplicitAny: response bodies are checked by the assertions
  return { status: res.status, body: out as Record<string, any> };
}

async function waitFor(what: string, fn: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(10);
  }
}

describe("authentication", () => {
  test("no auth, bad signature, stale timestamp, replay → 401 with the error envelope; a good signature → 202", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops });
    expect(f.reattached()).toBe(1); // the snapshots' devices are back before the first request
    const body = JSON.stringify({ source: "s3://images-bucket/app/" });
    const none = await call(s, "POST", "/v1/unpack", body, { "content-type": "application/json" });
    expect(none.status).toBe(401);
    expect(none.body).toMatchObject({ ok: false, error: { kind: "policy", message: expect.stringContaining("X-Thinimg-Signature") } });
    expect(typeof none.body.error.hint).toBe("string");

    const bad = await call(s, "POST", "/v1/unpack", body, signed(body, { secret: "another-secret-another-secret" }));
    expect(bad.status).toBe(401);
    expect(bad.body.error.message).toBe("bad signature");

    const tampered = signed(body);
    const other = await call(s, "POST", "/v1/unpack", JSON.stringify({ source: "s3://images-bucket/other/" }), tampered);
    expect(other.status).toBe(401);

    const stale = await call(s, "POST", "/v1/unpack", body, signed(body, { ts: Math.floor(Date.now() / 1000) - 301 }));
    expect(stale.status).toBe(401);
    expect(stale.body.error.message).toMatch(/stale timestamp/);
    const future = await call(s, "POST", "/v1/unpack", body, signed(body, { ts: Math.floor(Date.now() / 1000) + 400 }));
    expect(future.status).toBe(401);

    const h = signed(body);
    const good = await call(s, "POST", "/v1/unpack", body, h);
    expect(good.status).toBe(202);
    expect(good.body.job).toMatchObject({ kind: "unpack", image: "app", source: "s3://images-bucket/app/" });
    const replay = await call(s, "POST", "/v1/unpack", body, h);
    expect(replay.status).toBe(401);
    expect(replay.body.error.message).toMatch(/replayed/);

    // GET: the signature covers the empty body; a poller's reads within one second are not replays
    const get = signed("");
    const job = await call(s, "GET", `/v1/jobs/${good.body.job.id}`, undefined, get);
    expect(job.status).toBe(200);
    expect((await call(s, "GET", `/v1/jobs/${good.body.job.id}`, undefined, get)).status).toBe(200);
    expect((await call(s, "GET", "/v1/jobs", undefined, signed("", { ts: Math.floor(Date.now() / 1000) - 400 }))).status).toBe(401);
    expect(job.body.job.id).toBe(good.body.job.id);
    // nothing was queued by the refused requests
    expect((await call(s, "GET", "/v1/jobs", undefined, signed(""))).body.jobs).toHaveLength(1);
  });

  test("bearer token from --token-file; a wrong one → 401; SIGHUP-style reload picks up a new secret", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops, tokenFile: join(W, "token") });
    const body = JSON.stringify({ source: "s3://images-bucket/bearer/" });
    const ok = await call(s, "POST", "/v1/unpack", body, { authorization: `Bearer ${TOKEN}` });
    expect(ok.status).toBe(202);
    const wrong = await call(s, "POST", "/v1/unpack", body, { authorization: `Bearer ${TOKEN.slice(0, -1)}x` });
    expect(wrong.status).toBe(401);
    expect(wrong.body.error.message).toBe("bad bearer token");

    const secretFile = join(W, "secret");
    const NEW = "fedcba9876543210fedcba9876543210";
    writeFileSync(secretFile, NEW);
    try {
      s.reloadSecrets();
      const old = await call(s, "GET", "/v1/jobs", undefined, signed(""));
      expect(old.status).toBe(401);
      const fresh = await call(s, "GET", "/v1/jobs", undefined, signed("", { secret: NEW }));
      expect(fresh.status).toBe(200);
    } finally {
      writeFileSync(secretFile, SECRET);
    }
  });

  test("start-up refuses: no secret; --insecure-no-auth on a non-loopback address; a second service on the same pool", async () => {
    const f = fakeOps();
    const cfg = loadConfig({ stateDir: join(W, "refuse"), pool: "unitpool" }, {});
    await expect(startService({ cfg, listen: parseListen("127.0.0.1:0"), allowSources: [], ops: f.ops })).rejects.toThrow(/--secret-file is required/);
    await expect(startService({ cfg, listen: parseListen("0.0.0.0:0"), insecureNoAuth: true, allowSources: [], ops: f.ops })).rejects.toThrow(/loopback/);
    const s = await start({ ops: f.ops, stateDir: join(W, "refuse") });
    await expect(start({ ops: f.ops, stateDir: join(W, "refuse") })).rejects.toThrow(/another thinimg service runs for pool unitpool/);
    // --insecure-no-auth on loopback: no signature needed
    const open = await start({ ops: f.ops, secretFile: undefined, insecureNoAuth: true });
    expect((await call(open, "GET", "/v1/jobs", undefined, {})).status).toBe(200);
    expect(s.url).toStartWith("http://127.0.0.1:");
  });
});

test("unix socket listener", async () => {
  const f = fakeOps();
  const sock = join(W, "thinimg.sock");
  writeFileSync(sock, ""); // not a socket: left alone, so the listen fails loudly
  await expect(start({ ops: f.ops, listen: parseListen(`unix:${sock}`) })).rejects.toThrow();
  rmSync(sock);
  const s = await start({ ops: f.ops, listen: parseListen(`unix:${sock}`) });
  expect(s.url).toBe(`unix:${sock}`);
  const body = JSON.stringify({ source: "s3://images-bucket/sock/" });
  const res = await fetch("http://localhost/v1/unpack", { method: "POST", unix: sock, body, headers: signed(body) });
  expect(res.status).toBe(202);
  expect(((await (await fetch("http://localhost/healthz", { unix: sock })).json()) as { ok: boolean }).ok).toBe(true);
});

test("scripts/serve.ts: SIGHUP re-reads the secret file, SIGTERM stops it cleanly (exit 0)", async () => {
  const dir = join(W, "cli");
  mkdirSync(dir, { recursive: true });
  const secret = join(dir, "secret");
  writeFileSync(secret, SECRET);
  const proc = Bun.spawn(
    [
      "bun",
      "scripts/serve.ts",
      "--listen",
      "127.0.0.1:0",
      "--secret-file",
      secret,
      "--state-dir",
      join(dir, "state"),
      "--pool",
      "clipool",
      "--allow-source",
      "s3://images-bucket/",
    ],
    { cwd: join(import.meta.dir, "../.."), stdin: "ignore", stdout: "ignore", stderr: "pipe" },
  );
  let err = "";
  void (async () => {
    for await (const c of proc.stderr) err += new TextDecoder().decode(c);
  })();
  try {
    await waitFor("listening", () => /thinimg service on http/.test(err));
    const url = /thinimg service on (http:\/\/[\d.:]+)/.exec(err)![1]!;
    const get = async (key: string) => (await fetch(`${url}/v1/jobs`, { headers: signed("", { secret: key }) })).status;
    expect(await get(SECRET)).toBe(200);
    const NEW = "rotated-secret-rotated-secret-00";
    writeFileSync(secret, NEW);
    proc.kill("SIGHUP");
    await waitFor("secrets re-read", () => err.includes("secrets re-read"));
    expect([await get(SECRET), await get(NEW)]).toEqual([401, 200]);
    expect(err).not.toContain(SECRET);
    expect(err).not.toContain(NEW);
    proc.kill("SIGTERM");
    expect(await proc.exited).toBe(0);
  } finally {
    if (proc.exitCode === null) proc.kill(9);
  }
}, 60_000);

describe("request bodies", () => {
  test("over 64 KiB → 413; malformed JSON, wrong fields → 400 with the valibot message; unknown job/route → 404", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops });
    const big = JSON.stringify({ source: `s3://images-bucket/${"x".repeat(70 * 1024)}` });
    const tooBig = await call(s, "POST", "/v1/unpack", big);
    expect(tooBig.status).toBe(413);
    expect(tooBig.body).toMatchObject({ ok: false, error: { kind: "input" } });
    // chunked (no Content-Length): the limit still holds
    const stream = new ReadableStream({
      start(c) {
        for (let i = 0; i < 80; i++) c.enqueue(new TextEncoder().encode("x".repeat(1024)));
        c.close();
      },
    });
    const chunked = await fetch(`${s.url}/v1/unpack`, { method: "POST", body: stream, headers: signed("") });
    expect(chunked.status).toBe(413);

    const malformed = await call(s, "POST", "/v1/unpack", '{"source": "s3://images-bucket/a/"');
    expect(malformed.status).toBe(400);
    expect(malformed.body.error.message).toMatch(/not JSON/);
    const missing = await call(s, "POST", "/v1/unpack", { name: "x" });
    expect(missing.status).toBe(400);
    expect(missing.body.error.message).toMatch(/^invalid request body: source: /);
    const extra = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/a/", sauce: 1 });
    expect(extra.status).toBe(400);
    const badName = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/a/", name: "../x" });
    expect(badName.status).toBe(400);
    expect(badName.body.error.message).toMatch(/invalid image name/);
    const badSize = await call(s, "POST", "/v1/activate", { image: "a", size: "big" });
    expect(badSize.status).toBe(400);
    const noImage = await call(s, "POST", "/v1/activate", { image: "nope", size: "1G" });
    expect(noImage.status).toBe(404);
    expect(noImage.body.error.message).toMatch(/no image "nope"/);

    const noSnap = await call(s, "POST", "/v1/release", { snapshot: 42 });
    expect(noSnap.status).toBe(404);
    expect(noSnap.body.error.message).toMatch(/no snapshot "42"/);
    expect((await call(s, "GET", "/v1/jobs/999", undefined, signed(""))).status).toBe(404);
    expect((await call(s, "GET", "/v1/jobs?state=bogus", undefined, signed(""))).status).toBe(400);
    const route = await call(s, "GET", "/nope", undefined, {});
    expect(route.status).toBe(404);
    expect(route.body.ok).toBe(false);
    expect(f.calls).toEqual([]);
  });
});

describe("source allow-list", () => {
  test("file:, local paths, dot segments, metadata address, unlisted bucket → 403; listed prefixes → 202", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops });
    for (const source of [
      "file:///etc/passwd",
      "/etc/passwd",
      "etc/passwd",
      "s3://images-bucket/../secret-bucket/x",
      "s3://images-bucket/app/%2e%2e/%2e%2e/x",
      "https://registry.example/images/../admin/x.tar",
      "https://registry.example/images/%2E%2E/admin/x.tar",
      "http://169.254.169.254/latest/meta-data/",
      "https://registry.example.evil.test/images/x.tar",
      "https://registry.example@169.254.169.254/images/x.tar",
      "https://registry.example/imagesX/x.tar",
      "s3://other-bucket/app/",
      "s3://images-bucket-2/app/",
      "gopher://registry.example/images/",
    ]) {
      const r = await call(s, "POST", "/v1/unpack", { source });
      expect([source, r.status]).toEqual([source, 403]);
      expect(r.body.error.kind).toBe("policy");
      expect(r.body.error.hint).toMatch(/s3:\/\/images-bucket\//);
    }
    expect(f.calls).toEqual([]);
    const ok1 = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/team/app/" });
    const ok2 = await call(s, "POST", "/v1/unpack", { source: "HTTPS://Registry.Example/images/web.tar", name: "web" });
    expect([ok1.status, ok2.status]).toEqual([202, 202]);
    expect(ok2.body.job.source).toBe("https://registry.example/images/web.tar");
  });

  test("nothing is allowed by default; a local prefix admits only real paths under it (no symlink escape)", () => {
    const none = (() => {
      try {
        admitSource("s3://images-bucket/a/", makeAllowList([]));
      } catch (e) {
        return e as ThinimgError;
      }
    })();
    expect(none?.kind).toBe("policy");
    expect(none?.hint).toMatch(/allows no source yet: start it with --allow-source/);
    const root = join(W, "local-images");
    mkdirSync(join(root, "app"), { recursive: true });
    symlinkSync("/etc", join(root, "escape"));
    const allow = makeAllowList([`${root}/`]);
    expect(admitSource(join(root, "app"), allow)).toBe(join(root, "app"));
    expect(admitSource(`file://${root}/app`, allow)).toBe(join(root, "app"));
    expect(() => admitSource(join(root, "escape"), allow)).toThrow(/outside the allowed directories/);
    expect(() => admitSource(`${root}/../`, allow)).toThrow(/path segments/);
    expect(() => admitSource("/etc/passwd", allow)).toThrow(/outside the allowed directories/);
    expect(() => makeAllowList(["relative/dir"])).toThrow(/absolute/);
    expect(() => makeAllowList(["ftp://x/"])).toThrow(/unsupported scheme/);
  });
});

describe("jobs", () => {
  test("50 concurrent requests for 3 images → 3 jobs, 3 builds, 50 correct answers", async () => {
    const f = fakeOps({ gated: true });
    const s = await start({ ops: f.ops });
    const images = ["alpha", "beta", "gamma"];
    // identical requests signed in the same second would be replays: each caller signs at its own time
    const t = Math.floor(Date.now() / 1000);
    const answers = await Promise.all(
      Array.from({ length: 50 }, (_, i) => {
        const body = JSON.stringify({ source: `s3://images-bucket/${images[i % 3]}/` });
        return call(s, "POST", "/v1/unpack", body, signed(body, { ts: t - i }));
      }),
    );
    const created = answers.filter((a) => a.status === 202);
    expect(created.map((a) => a.body.job.image).sort()).toEqual(images);
    expect(answers.filter((a) => a.status === 200)).toHaveLength(47);
    const idOf = new Map(created.map((a) => [a.body.job.image as string, a.body.job.id as number]));
    for (const a of answers) expect(a.body.job.id).toBe(idOf.get(a.body.job.image)!);
    // the same name from another source while its job is live → 409
    const clash = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/other/", name: "beta" });
    expect(clash.status).toBe(409);
    expect(clash.body.error.message).toMatch(/already being unpacked from s3:\/\/images-bucket\/beta\//);
    f.open();
    await waitFor("3 jobs done", () => images.every((i) => getJob(s.ctx.db, idOf.get(i)!)?.state === "succeeded"));
    expect(f.calls.sort()).toEqual(images);
    const done = await call(s, "GET", `/v1/jobs/${idOf.get("beta")}`, undefined, signed(""));
    expect(done.body.job).toMatchObject({ state: "succeeded", result: { built: 1, image: { name: "beta" } } });
    expect(done.body.job.finished_at).toMatch(/^\d{4}-/);
    // finished: the same image again is a new job (the pipeline decides it is a no-op)
    const again = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/beta/" });
    expect(again.status).toBe(202);
    expect(again.body.job.id).not.toBe(idOf.get("beta"));
  });

  test("a failed unpack: the job says why with the CLI's error kind and hint", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops });
    const r = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/broken/" });
    await waitFor("job failed", () => getJob(s.ctx.db, r.body.job.id)?.state === "failed");
    const j = await call(s, "GET", `/v1/jobs?state=failed`, undefined, signed(""));
    expect(j.body.jobs[0]).toMatchObject({
      id: r.body.job.id,
      state: "failed",
      error: { kind: "input", message: expect.stringContaining("no layers"), hint: "check the source" },
    });
  });

  test("restart with queued and interrupted jobs: none lost, none run twice, in order", async () => {
    const stateDir = join(W, "restart");
    const a = fakeOps({ gated: true });
    const s1 = await start({ ops: a.ops, stateDir, drainMs: 0 });
    const ids: number[] = [];
    for (const img of ["one", "two", "three"]) ids.push((await call(s1, "POST", "/v1/unpack", { source: `s3://images-bucket/${img}/` })).body.job.id);
    await waitFor("job one running", () => a.calls.length === 1);
    // the next queued job's download runs ahead (--prefetch 1), the one after waits its turn
    await waitFor("job two prefetched", () => a.prefetched.length === 1);
    expect(a.prefetched).toEqual(["two"]);
    running.splice(running.indexOf(s1), 1);
    const { interrupted } = await s1.stop();
    expect(interrupted?.id).toBe(ids[0]);
    expect(getJob(s1.ctx.db, ids[0]!)?.state).toBe("interrupted");
    expect([getJob(s1.ctx.db, ids[1]!)?.state, getJob(s1.ctx.db, ids[2]!)?.state]).toEqual(["queued", "queued"]);
    expect(a.calls).toEqual(["one"]);

    const b = fakeOps();
    const s2 = await start({ ops: b.ops, stateDir });
    await waitFor("all done", () => ids.every((id) => getJob(s2.ctx.db, id)?.state === "succeeded"));
    expect(b.calls).toEqual(["one", "two", "three"]);
    expect(getJob(s2.ctx.db, ids[0]!)?.attempts).toBe(2);
    expect(getJob(s2.ctx.db, ids[1]!)?.attempts).toBe(1);
    running.splice(running.indexOf(s2), 1);
    await s2.stop();
    // a third start finds nothing to do
    const c = fakeOps();
    const s3 = await start({ ops: c.ops, stateDir });
    await Bun.sleep(100);
    expect(c.calls).toEqual([]);
    expect((await call(s3, "GET", "/v1/jobs?state=succeeded", undefined, signed(""))).body.jobs).toHaveLength(3);
  });

  test("SIGTERM path: 503 while draining, the running job finishes within the drain time", async () => {
    const f = fakeOps({ gated: true });
    const s = await start({ ops: f.ops, drainMs: 10_000 });
    const r = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/drain/" });
    await waitFor("running", () => f.calls.length === 1);
    running.splice(running.indexOf(s), 1);
    const stopping = s.stop();
    const during = await call(s, "GET", "/v1/jobs", undefined, signed(""));
    expect(during.status).toBe(503);
    expect(during.body.error.message).toMatch(/stopping/);
    expect((await call(s, "GET", "/readyz", undefined, {})).status).toBe(503);
    expect((await call(s, "GET", "/healthz", undefined, {})).body).toEqual({ ok: true, draining: true });
    f.open();
    expect((await stopping).interrupted).toBeNull();
    const db = openDb(join(s.ctx.cfg.stateDir, "state.db"));
    expect(getJob(db, r.body.job.id)?.state).toBe("succeeded");
    db.close();
  });

  test("retention: finished jobs older than the period are pruned, live ones never", () => {
    const db = openDb(join(W, "prune", "state.db"));
    const old = enqueueUnpack(db, { pool: "p", image: "old", source: "s3://b/old/", params: {} }).job;
    claimNextJob(db, "p");
    finishJob(db, old.id, { ok: true, result: {} });
    const live = enqueueUnpack(db, { pool: "p", image: "live", source: "s3://b/live/", params: {} }).job;
    expect(pruneJobs(db, "p", 60_000)).toBe(0);
    expect(pruneJobs(db, "p", 60_000, Date.now() + 120_000)).toBe(1);
    expect(getJob(db, old.id)).toBeNull();
    expect(getJob(db, live.id)?.state).toBe("queued");
    db.close();
  });
});

describe("images", () => {
  test("DELETE /v1/images/:name removes an image (idempotent, 404 for an unknown one); POST /v1/prune needs a rule", async () => {
    const f = fakeOps();
    const stateDir = join(W, "images");
    const s = await start({ ops: f.ops, stateDir });
    const db = openDb(join(stateDir, "state.db"));
    for (const name of ["web-1", "web-2"]) {
      const i = beginImage(db, { pool: "unitpool", name, source: `/src/${name}`, format: "layer-family" });
      markImageReady(db, i.id, { format: "layer-family", config: null, layerIds: [], topChainId: null });
    }
    db.close();
    const names = async () => (await call(s, "GET", "/v1/images")).body.images.map((i: { name: string }) => i.name);
    expect(await names()).toEqual(["web-1", "web-2"]);
    const mismatch = await call(s, "DELETE", "/v1/images/web-1", { image: "web-2" });
    expect(mismatch.status).toBe(400);
    const del = await call(s, "DELETE", "/v1/images/web-1", { image: "web-1" });
    expect(del.status).toBe(200);
    expect(del.body.images).toMatchObject([{ name: "web-1", state: "removed" }]);
    expect(await names()).toEqual(["web-2"]);
    // no body is accepted too (a signature over the timestamp alone)
    expect((await call(s, "DELETE", "/v1/images/web-1")).body.images).toMatchObject([{ name: "web-1", state: "already_removed" }]);
    const unknown = await call(s, "DELETE", "/v1/images/nope", { image: "nope" });
    expect(unknown.status).toBe(404);
    expect(unknown.body).toMatchObject({ ok: false, error: { kind: "missing" } });
    // a name of any length is quoted cut short: the answer and its log line stay one readable line
    const long = await call(s, "DELETE", `/v1/images/${"a".repeat(250)}`, { image: "a".repeat(250) });
    expect([long.status, long.body.error.message]).toEqual([404, `no image "${"a".repeat(80)}…" in pool unitpool`]);

    const noRule = await call(s, "POST", "/v1/prune", {});
    expect(noRule.status).toBe(400);
    expect(noRule.body.error.message).toContain("unused_for, keep_last");
    // a bare number would be seconds: refused, nothing pruned
    const bare = await call(s, "POST", "/v1/prune", { unused_for: "7" });
    expect([bare.status, bare.body.error.message]).toEqual([400, 'unused_for: "7" has no unit']);
    expect(await names()).toEqual(["web-2"]);
    const dry = await call(s, "POST", "/v1/prune", { keep_last: 0, dry_run: true });
    expect(dry.status).toBe(200);
    expect(dry.body).toMatchObject({ ok: true, dry_run: true, removed: [] });
    expect(dry.body.prune.map((p: { name: string }) => p.name)).toEqual(["web-2"]);
    expect(await names()).toEqual(["web-2"]);
  });
});

describe("health and metrics", () => {
  test("/healthz, /readyz and /metrics (Prometheus text, thinimg_*) without auth", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops });
    expect((await call(s, "GET", "/healthz", undefined, {})).body).toEqual({ ok: true, draining: false });
    const ready = await call(s, "GET", "/readyz", undefined, {});
    expect(ready.status).toBe(200);
    expect(ready.body).toMatchObject({ ok: true, healthy: true, pool: "unitpool" });
    const r = await call(s, "POST", "/v1/unpack", { source: "s3://images-bucket/m/" });
    await waitFor("done", () => getJob(s.ctx.db, r.body.job.id)?.state === "succeeded");
    const res = await fetch(`${s.url}/metrics`);
    expect(res.headers.get("content-type")).toMatch(/^text\/plain; version=0.0.4/);
    const text = await res.text();
    expect(text).toMatch(/^thinimg_build_info\{version="\d+\.\d+\.\d+",pool="unitpool"\} 1$/m);
    expect(text).toMatch(/^thinimg_jobs\{state="succeeded"\} 1$/m);
    expect(text).toMatch(/^thinimg_jobs\{state="queued"\} 0$/m);
    expect(text).toMatch(/^thinimg_job_duration_seconds_count\{kind="unpack",outcome="succeeded"\} 1$/m);
    expect(text).toMatch(/^thinimg_health_check\{check="host.memory",status="ok"\} 1$/m);
    expect(text).toMatch(/^thinimg_healthy 1$/m);
    expect(text).toMatch(/^thinimg_pool_mode\{mode="(unavailable|fail|error)"\} 1$/m);
    for (const name of ["thinimg_images", "thinimg_layers", "thinimg_snapshots", "thinimg_command_duration_seconds", "thinimg_gc_last_run_timestamp_seconds"]) {
      expect(text).toContain(`# TYPE ${name} `);
    }
  });

  test("the metrics file of the last GC run, and command labels", async () => {
    const f = fakeOps();
    const s = await start({ ops: f.ops });
    writeFileSync(
      join(s.ctx.cfg.stateDir, "gc-last-run.json"),
      JSON.stringify({
        ok: true,
        mode: "force",
        started_at: "2026-12-01T00:00:00.000Z",
        duration_ms: 5,
        summary: { orphans: 4, removed: 3, skipped: 1, failed: 0 },
      }),
    );
    const text = await (await fetch(`${s.url}/metrics`)).text();
    expect(text).toContain(`\nthinimg_gc_last_run_timestamp_seconds ${Date.parse("2026-12-01T00:00:00.000Z") / 1000}\n`);
    expect(text).toMatch(/^thinimg_gc_last_run_orphans\{outcome="seen"\} 4$/m);
    expect(text).toMatch(/^thinimg_gc_last_run_orphans\{outcome="removed"\} 3$/m);
    expect(commandLabel("dmsetup --noudevsync message pool1 0 create_snap 5 4")).toBe("dmsetup message create_snap");
    expect(commandLabel("dmsetup status pool1")).toBe("dmsetup status");
    expect(commandLabel("/sbin/mkfs.ext4 -q -F /dev/mapper/x")).toBe("mkfs.ext4");
  });
});

describe("the pre-flight of activations and releases (the health gate)", () => {
  /** Activations that run the gate's pre-flight before their (pretend) dm work; health from a script. */
  function gatedOps(health: { status: "ok" | "block" }) {
    const events: string[] = [];
    const f = fakeOps();
    const ops: ServiceOps = {
      ...f.ops,
      async activate(ctx, image, o) {
        await o.preflight?.(ctx);
        events.push(`dm ${image}`);
        return {
          snapshot_id: 1,
          image,
          thin_id: 7,
          device_name: "thinimg-unitpool-snap-7",
          device_path: "/dev/mapper/thinimg-unitpool-snap-7",
          duration_ms: 1,
        };
      },
      async preflightChecks(ctx) {
        events.push("check");
        await Bun.sleep(5);
        const block = health.status === "block";
        return {
          healthy: !block,
          pool: ctx.cfg.pool,
          checks: [
            {
              name: "pool.mode",
              status: health.status,
              message: block ? "pool unitpool is read-only (ro)" : "mode rw",
              runbook: block ? "see ops" : "",
              durationMs: 5,
            },
          ],
          durationMs: 5,
        };
      },
    };
    return { ops, events };
  }

  // distinct signatures for identical bodies sent within one second (the replay cache refuses repeats)
  let lastTs = Number.POSITIVE_INFINITY;
  const activateWeb = (s: Service) => {
    const body = JSON.stringify({ image: "web" });
    lastTs = Math.min(Math.floor(Date.now() / 1000), lastTs - 1);
    return call(s, "POST", "/v1/activate", body, signed(body, { ts: lastTs }));
  };

  async function withImage(o: Partial<ServiceOptions> & { ops: ServiceOps }): Promise<Service> {
    const stateDir = join(W, `gate-${++n}`);
    const s = await start({ ...o, stateDir });
    const db = openDb(join(stateDir, "state.db"));
    const i = beginImage(db, { pool: "unitpool", name: "web", source: "/src/web", format: "layer-family" });
    markImageReady(db, i.id, { format: "layer-family", config: null, layerIds: [], topChainId: null });
    db.close();
    await s.gate.probe(); // the start-up probe
    return s;
  }

  test("a fresh passed probe lets the activation through without running the checks in the request; one runs after it", async () => {
    const h = { status: "ok" as const };
    const g = gatedOps(h);
    const s = await withImage({ ops: g.ops, healthPeriodMs: 0 });
    g.events.length = 0;
    const a = await activateWeb(s);
    expect(a.status).toBe(200);
    expect(a.body.snapshot.device).toBe("/dev/mapper/thinimg-unitpool-snap-7");
    await s.gate.settled();
    expect(g.events).toEqual(["dm web", "check"]);
  });

  test("a failed probe within the bound blocks the activation with 503 before any dm work; a passing one later admits", async () => {
    const h: { status: "ok" | "block" } = { status: "block" };
    const g = gatedOps(h);
    const s = await withImage({ ops: g.ops, healthPeriodMs: 0 });
    const a = await activateWeb(s);
    expect(a.status).toBe(503);
    expect(a.body).toMatchObject({
      ok: false,
      error: { kind: "unhealthy", message: "health check pool.mode blocks dm work: pool unitpool is read-only (ro)", hint: "see ops" },
    });
    await s.gate.settled();
    expect(g.events.filter((e) => e.startsWith("dm"))).toEqual([]);
    // the host recovers: the probe after the refused request saw it, so the next request goes through
    h.status = "ok";
    await s.gate.probe();
    expect((await activateWeb(s)).status).toBe(200);
    const text = await (await fetch(`${s.url}/metrics`)).text();
    expect(text).toMatch(/^thinimg_preflight_requests_total\{outcome="refused"\} 1$/m);
    expect(text).toMatch(/^thinimg_preflight_requests_total\{outcome="cached"\} 1$/m);
    expect(text).toMatch(/^thinimg_preflight_requests_total\{outcome="waited"\} 0$/m);
    expect(text).toMatch(/^thinimg_preflight_probe_passed 1$/m);
    expect(text).toMatch(/^thinimg_preflight_probe_age_seconds \d/m);
  });

  test("a stale probe is checked again inside the request (synchronously), and its verdict decides", async () => {
    const h: { status: "ok" | "block" } = { status: "ok" };
    const g = gatedOps(h);
    const s = await withImage({ ops: g.ops, healthPeriodMs: 0, healthMaxAgeMs: 50 });
    await s.gate.settled(); // the start-up probe (a moment after the start), then past its age
    await Bun.sleep(80);
    g.events.length = 0;
    expect((await activateWeb(s)).status).toBe(200);
    await s.gate.settled();
    expect(g.events).toEqual(["check", "dm web", "check"]);
    await Bun.sleep(80);
    h.status = "block";
    g.events.length = 0;
    expect((await activateWeb(s)).status).toBe(503);
    await s.gate.settled();
    expect(g.events).toEqual(["check", "check"]);
  });
});
