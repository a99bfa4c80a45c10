// The service end to end on the real kernel: `bun scripts/serve.ts` as a process on 127.0.0.1, a
// layer family served by a real S3 server (s3rver, in this process), signed webhook calls. Unpack
// through a job, activate with a size (ext4 grown to fill it), mount and read, release; metrics and
// readiness from the live pool; SIGTERM in the middle of a job, then a restart finishes it; the
// health gate (activations on the background pre-flight; a suspended pool → 503, no dm command).
// vm-seconds: 60 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, statfsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { loadConfig } from "../../lib/config.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { type CmdRecord, onCommandRecord, runOk } from "../../lib/exec.ts";
import { checkConsistency } from "../../lib/pipeline/consistency.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { sign } from "../../lib/server/auth.ts";
import { parseListen } from "../../lib/server/listen.ts";
import { serviceHealthDir, startService } from "../../lib/server/service.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeTestPool, type TestPool, unmountUnder } from "../helpers/pool.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";

requireDm();

const ROOT = join(import.meta.dir, "../..");
const W = mkdtempSync("/tmp/thinimg-service-vm-");
const SECRET = "vm-test-secret-0123456789abcdef";
const secretFile = join(W, "secret");
writeFileSync(secretFile, SECRET, { mode: 0o600 });
const stateDir = join(W, "state");
let s3: TestS3;
let pool: TestPool;
const procs: Subprocess[] = [];

const layers = (tag: string) => [
  buildLayerTar([
    { path: "etc/", type: "dir" },
    { path: "etc/release", content: `${tag} v1\n` },
    { path: "bin/", type: "dir" },
    { path: "bin/hello", content: "#!/bin/sh\necho hello\n", mode: 0o755 },
  ]),
  buildLayerTar([
    { path: "data/", type: "dir" },
    { path: "data/two.txt", content: `${tag} layer two\n` },
  ]),
  buildLayerTar([{ path: "etc/release", content: `${tag} v3\n` }, { path: "bin/.wh.hello" }]),
];

beforeAll(async () => {
  await runOk(["ip", "link", "set", "lo", "up"]);
  s3 = await startS3(["images"]);
  for (const tag of ["fam", "slow"]) for (const [i, l] of layers(tag).entries()) await s3.put("images", `${tag}/${i + 1}.tar`, l);
  pool = await makeTestPool({ dataSize: "1G" });
  mkdirSync(stateDir, { recursive: true });
  await primeKernelLogCursor(stateDir);
  await primeKernelLogCursor(serviceHealthDir(stateDir));
}, 60_000);

afterAll(async () => {
  for (const p of procs) if (p.exitCode === null) p.kill(9);
  await unmountUnder(W);
  await pool?.destroy();
  await s3?.close();
  Bun.spawnSync(["rm", "-rf", W]);
}, 60_000);

interface Running {
  proc: Subprocess<"ignore", "ignore", "pipe">;
  url: string;
  stderr: () => string;
}

/** Start the service; resolves with its URL once it listens (port 0: the kernel picks one). */
async function serve(extraEnv: Record<string, string> = {}): Promise<Running> {
  const proc = Bun.spawn(
    [
      "bun",
      "scripts/serve.ts",
      "--listen",
      "127.0.0.1:0",
      "--secret-file",
      secretFile,
      "--allow-source",
      "s3://images/",
      "--state-dir",
      stateDir,
      "--pool",
      pool.name,
      "--virtual-size",
      "128M",
      "--drain-timeout",
      "0",
    ],
    { cwd: ROOT, env: { ...process.env, ...s3.env(true), ...extraEnv }, stdin: "ignore", stdout: "ignore", stderr: "pipe" },
  );
  procs.push(proc);
  let err = "";
  const reader = (async () => {
    for await (const chunk of proc.stderr) err += new TextDecoder().decode(chunk);
  })();
  void reader;
  const deadline = Date.now() + 30_000;
  for (;;) {
    const m = /thinimg service on (http:\/\/127\.0\.0\.1:\d+)/.exec(err);
    if (m) return { proc, url: m[1]!, stderr: () => err };
    if (proc.exitCode !== null || Date.now() > deadline) throw new Error(`serve did not start (exit ${proc.exitCode}): ${err.slice(-2000)}`);
    await Bun.sleep(50);
  }
}

let lastTs = Number.POSITIVE_INFINITY;
async function call(s: Running, method: string, path: string, body?: unknown) {
  const text = body === undefined ? "" : JSON.stringify(body);
  // distinct timestamps: two identical POSTs in one second would be replays (GETs are not)
  const now = Math.floor(Date.now() / 1000);
  if (method !== "GET") lastTs = Math.min(now, lastTs - 1);
  const ts = String(method === "GET" ? now : lastTs);
  const res = await fetch(`${s.url}${path}`, {
    method,
    body: method === "GET" ? undefined : text,
    headers: { "content-type": "application/json", "x-thinimg-timestamp": ts, "x-thinimg-signature": `sha256=${sign(SECRET, ts, text)}` },
  });
  // biome-ignore lint/suspicious/noExplicitAny: response bodies are checked by the assertions
  return { status: res.status, body: (await res.json()) as Record<string, any> };
}

async function waitJob(s: Running, id: number, ms = 100_000): Promise<Record<string, unknown>> {
  const until = Date.now() + ms;
  for (;;) {
    const r = await call(s, "GET", `/v1/jobs/${id}`);
    expect(r.status).toBe(200);
    if (r.body.job.state === "succeeded" || r.body.job.state === "failed") return r.body.job;
    if (Date.now() > until) throw new Error(`job ${id} still ${r.body.job.state}: ${s.stderr().slice(-2000)}`);
    await Bun.sleep(200);
  }
}

async function stop(s: Running): Promise<number> {
  s.proc.kill("SIGTERM");
  return await s.proc.exited;
}

describe("service on the real kernel", () => {
  test("signed unpack from S3 → job; activate with a size → grown ext4, files readable; release; metrics", async () => {
    const s = await serve();
    try {
      const q = await call(s, "POST", "/v1/unpack", { source: "s3://images/fam/", name: "fam" });
      expect(q.status).toBe(202);
      const job = await waitJob(s, q.body.job.id);
      expect(job).toMatchObject({ state: "succeeded", image: "fam", result: { built: 3, image: { name: "fam", state: "ready" } } });

      const small = await call(s, "POST", "/v1/activate", { image: "fam", size: "64M" });
      expect(small.status).toBe(400);
      expect(small.body.error.message).toMatch(/below image fam's own size/);

      const a = await call(s, "POST", "/v1/activate", { image: "fam", size: "1G" });
      expect(a.status).toBe(200);
      const dev: string = a.body.snapshot.device;
      expect(dev).toStartWith("/dev/mapper/thinimg-");
      const bytes = Number((await runOk(["blockdev", "--getsize64", dev])).stdout.trim());
      expect(bytes).toBe(1024 ** 3);
      const dir = join(W, "mnt");
      mkdirSync(dir, { recursive: true });
      await mnt.mount(dev, dir);
      try {
        const fs = statfsSync(dir);
        // the filesystem fills the device (less ext4's own metadata), not the image's 256M
        expect(fs.blocks * fs.bsize).toBeGreaterThan(900 * 1024 ** 2);
        expect(readFileSync(join(dir, "etc/release"), "utf8")).toBe("fam v3\n");
        expect(readFileSync(join(dir, "data/two.txt"), "utf8")).toBe("fam layer two\n");
        expect(existsSync(join(dir, "bin/hello"))).toBe(false);
        // the grown space is usable: more than the image's whole size fits
        await runOk(["fallocate", "-l", "400M", join(dir, "big")]);
      } finally {
        await mnt.umount(dir);
      }
      const plain = await call(s, "POST", "/v1/activate", { image: "fam" });
      expect(plain.status).toBe(200);
      expect(Number((await runOk(["blockdev", "--getsize64", plain.body.snapshot.device])).stdout.trim())).toBe(128 * 1024 ** 2);

      const rel = await call(s, "POST", "/v1/release", { snapshot: a.body.snapshot.id });
      expect(rel.status).toBe(200);
      expect(rel.body.snapshot).toMatchObject({ id: a.body.snapshot.id, state: "released" });
      expect(existsSync(dev)).toBe(false);
      expect((await call(s, "POST", "/v1/release", { snapshot: plain.body.snapshot.device })).body.snapshot.state).toBe("released");

      const ready = await fetch(`${s.url}/readyz`);
      expect(ready.status).toBe(200);
      const text = await (await fetch(`${s.url}/metrics`)).text();
      expect(text).toMatch(/^thinimg_pool_mode\{mode="rw"\} 1$/m);
      expect(text).toMatch(/^thinimg_pool_used_ratio\{space="data"\} 0\.\d+$/m);
      expect(text).toMatch(/^thinimg_images\{state="ready"\} 1$/m);
      expect(text).toMatch(/^thinimg_snapshots\{state="released"\} 2$/m);
      expect(text).toMatch(/^thinimg_jobs\{state="succeeded"\} 1$/m);
      expect(text).toMatch(/^thinimg_command_duration_seconds_count\{command="resize2fs"\} 1$/m);
      expect(text).toMatch(/^thinimg_command_duration_seconds_count\{command="dmsetup message create_snap"\} [1-9]\d*$/m);
      expect(text).toMatch(/^thinimg_health_check\{check="pool.status",status="ok"\} 1$/m);
    } finally {
      expect(await stop(s)).toBe(0);
    }
  }, 300_000);

  test("mid-job: activations answer; SIGTERM: job interrupted, no dm clean-up; a restart completes it", async () => {
    const marker = join(W, "paused");
    const s1 = await serve({ THINIMG_TEST_PAUSE_AT: "layer:activated#2", THINIMG_TEST_PAUSE_FILE: marker });
    const q = await call(s1, "POST", "/v1/unpack", { source: "s3://images/slow/", name: "slow" });
    expect(q.status).toBe(202);
    const until = Date.now() + 90_000;
    while (!existsSync(marker)) {
      if (Date.now() > until) throw new Error(`never paused: ${s1.stderr().slice(-2000)}`);
      await Bun.sleep(100);
    }
    // the unpack holds its image and layer locks mid-build: an activation of another image does not
    // wait for it (it queues only for its own dm commands)
    const t0 = performance.now();
    const a = await call(s1, "POST", "/v1/activate", { image: "fam" });
    expect(a.status).toBe(200);
    expect(performance.now() - t0).toBeLessThan(20_000);
    expect((await call(s1, "GET", `/v1/jobs/${q.body.job.id}`)).body.job.state).toBe("running");
    expect((await call(s1, "POST", "/v1/release", { snapshot: a.body.snapshot.id })).status).toBe(200);
    const kept = await call(s1, "POST", "/v1/activate", { image: "fam" });
    expect(kept.status).toBe(200);
    const devicesBefore = (await runOk(["dmsetup", "ls"])).stdout;
    expect(await stop(s1)).toBe(0);
    expect(s1.stderr()).toMatch(new RegExp(`job ${q.body.job.id} \\(slow\\) interrupted`));
    // nothing was cleaned up: the half-built layer's device is still there for the restart
    expect((await runOk(["dmsetup", "ls"])).stdout).toBe(devicesBefore);
    // as a reboot would: the handed-out snapshot's device goes, its data stays
    const keptName: string = kept.body.snapshot.device_name;
    const keptTable = (await runOk(["dmsetup", "table", keptName])).stdout;
    await runOk(["dmsetup", "remove", keptName]);

    const s2 = await serve();
    try {
      // the restarted service re-attached it before answering: same name, same table
      expect((await runOk(["dmsetup", "table", keptName])).stdout).toBe(keptTable);
      expect((await call(s2, "POST", "/v1/release", { snapshot: kept.body.snapshot.id })).status).toBe(200);
      const job = await waitJob(s2, q.body.job.id);
      expect(job).toMatchObject({ state: "succeeded", image: "slow", attempts: 2 });
      const a = await call(s2, "POST", "/v1/activate", { image: "slow" });
      expect(a.status).toBe(200);
      const dir = join(W, "mnt-slow");
      mkdirSync(dir, { recursive: true });
      await mnt.mount(a.body.snapshot.device, dir, { readOnly: true });
      try {
        expect(readFileSync(join(dir, "data/two.txt"), "utf8")).toBe("slow layer two\n");
        expect(readFileSync(join(dir, "etc/release"), "utf8")).toBe("slow v3\n");
      } finally {
        await mnt.umount(dir);
      }
      expect((await call(s2, "POST", "/v1/release", { snapshot: a.body.snapshot.id })).status).toBe(200);
      const list = await call(s2, "GET", "/v1/jobs");
      expect(list.body.jobs.map((j: { image: string; state: string }) => `${j.image}:${j.state}`).sort()).toEqual(["fam:succeeded", "slow:succeeded"]);
    } finally {
      expect(await stop(s2)).toBe(0);
    }
    const ctx = makeCtx(loadConfig({ stateDir, pool: pool.name }, {}), { command: "service.test check" });
    try {
      const c = await checkConsistency(ctx);
      expect(c.problems).toEqual([]);
    } finally {
      ctx.db.close();
    }
  }, 300_000);

  test("health gate: a fresh probe admits without a status read in the request; a stale one is read first; a suspended pool → 503, nothing sent", async () => {
    // in-process, to watch the commands each request runs (the image "fam" comes from the first test)
    const cfg = loadConfig({ stateDir, pool: pool.name, virtualSize: "128M" }, {});
    const s = await startService({ cfg, listen: parseListen("127.0.0.1:0"), secretFile, allowSources: [], healthPeriodMs: 0, healthMaxAgeMs: 1_500 });
    const here: Running = { url: s.url, proc: null as never, stderr: () => "" };
    const seen: CmdRecord[] = [];
    const off = onCommandRecord((r) => seen.push(r));
    /** The request's answer and the commands it ran ("dmsetup SUB"), no probe running before it. */
    const during = async (path: string, body: unknown) => {
      await s.gate.settled();
      seen.length = 0;
      const r = await call(here, "POST", path, body);
      const cmds = seen.map((c) => c.command.replace(/^dmsetup (--noudevsync )?(\S+).*$/, "dmsetup $2"));
      // the probe started after the request's dm work (the refresh) may end before the answer arrives
      while (cmds.at(-1) === "dmsetup status" && cmds.length > 1) cmds.pop();
      return { ...r, cmds };
    };
    try {
      await s.gate.probe();
      const fresh = await during("/v1/activate", { image: "fam" });
      expect(fresh.status).toBe(200);
      expect(fresh.cmds).toEqual(["dmsetup message", "dmsetup create"]);

      await Bun.sleep(1_600); // the last probe is now older than the bound: read again, before the dm work
      const stale = await during("/v1/activate", { image: "fam" });
      expect(stale.status).toBe(200);
      expect(stale.cmds.slice(0, 3)).toEqual(["dmsetup status", "dmsetup message", "dmsetup create"]);

      await s.gate.settled(); // the probe after the last request (it starts a moment after the answer) read the pool before this
      await runOk(["dmsetup", "suspend", pool.name]);
      try {
        await s.gate.probe();
        const blocked = await during("/v1/activate", { image: "fam" });
        expect(blocked.status).toBe(503);
        expect(blocked.body.error).toMatchObject({ kind: "unhealthy", message: expect.stringContaining("pool.suspended") });
        expect(blocked.cmds.filter((c) => c !== "dmsetup status")).toEqual([]);
        const rel = await during("/v1/release", { snapshot: fresh.body.snapshot.id });
        expect(rel.status).toBe(503);
        expect(rel.cmds.filter((c) => c !== "dmsetup status" && c !== "dmsetup info")).toEqual([]);
      } finally {
        await runOk(["dmsetup", "resume", pool.name]);
      }
      await s.gate.settled(); // a probe started while it was suspended still says so
      await s.gate.probe();
      for (const a of [fresh, stale]) expect((await during("/v1/release", { snapshot: a.body.snapshot.id })).status).toBe(200);
    } finally {
      off();
      await s.stop();
    }
  }, 120_000);
});
