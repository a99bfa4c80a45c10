// Streamed S3 unpack on the real kernel (s3rver in this process on 127.0.0.1): a layer family is
// applied while it downloads and committed under the digest its download computed; a wrong digest
// fails that layer dumb; an unpack killed mid-stream is completed by a re-run.
// vm-seconds: 150 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { runOk } from "../../lib/exec.ts";
import { BlobCache } from "../../lib/image/cache.ts";
import { resolveImage } from "../../lib/image/resolve.ts";
import { activate, release } from "../../lib/pipeline/activate.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { type Ctx, makeCtx } from "../../lib/pool/context.ts";
import { listLayers } from "../../lib/store/layers.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar, compress, sha256, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeTestPool, type TestPool, unmountUnder } from "../helpers/pool.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";

requireDm();

const ROOT = join(import.meta.dir, "../..");
const W = mkdtempSync("/tmp/thinimg-streamed-vm-");
let pool: TestPool;
let ctx: Ctx;
let s3: TestS3;
let env: Record<string, string>;

/** A distinct 3-layer family (layer 2 gzip'ed), uploaded under `prefix` and written locally too. */
async function family(prefix: string): Promise<{ blobs: Uint8Array[]; dir: string }> {
  const big = new Uint8Array(3 * 1024 * 1024).map((_, i) => (i * 7 + prefix.length) & 0xff);
  const tars = [
    buildLayerTar([
      { path: "etc/", type: "dir" },
      { path: "etc/name", content: `${prefix}\n` },
      { path: "gone", content: "removed by layer 3" },
    ]),
    buildLayerTar([
      { path: "usr/", type: "dir" },
      { path: "usr/blob", content: big },
    ]),
    buildLayerTar([{ path: "top", content: `${prefix} top\n` }, { path: ".wh.gone" }]),
  ];
  const blobs = [tars[0]!, compress(tars[1]!, "gzip"), tars[2]!];
  for (const [i, b] of blobs.entries()) await s3.put("imgs", `${prefix}/${i + 1}.tar`, b);
  const dir = join(W, "local", prefix);
  writeLayerFamily(dir, blobs);
  return { blobs, dir };
}

async function filesOf(name: string): Promise<{ name: string; top: string; blob: string; gone: boolean }> {
  const a = await activate(ctx, name);
  const dir = join(W, `m-${name}`);
  mkdirSync(dir, { recursive: true });
  await mnt.mount(a.device_path, dir, { readOnly: true, options: ["noload"] });
  try {
    return {
      name: readFileSync(join(dir, "etc/name"), "utf8"),
      top: readFileSync(join(dir, "top"), "utf8"),
      blob: String(Bun.hash(readFileSync(join(dir, "usr/blob")))),
      gone: existsSync(join(dir, "gone")),
    };
  } finally {
    await runOk(["umount", dir]);
    await release(ctx, String(a.snapshot_id));
  }
}

beforeAll(async () => {
  await runOk(["ip", "link", "set", "lo", "up"]);
  s3 = await startS3(["imgs"]);
  env = s3.env(false);
  Object.assign(process.env, env); // unpack reads the S3 endpoint from the environment
  pool = await makeTestPool({ dataSize: "1G" });
  await primeKernelLogCursor(join(W, "state"));
  ctx = makeCtx(loadConfig({ stateDir: join(W, "state"), pool: pool.name, virtualSize: "128M", wait: "60s" }, {}), { command: "streamed.test" });
}, 60_000);

afterAll(async () => {
  await unmountUnder(W);
  ctx?.db.close();
  await pool?.destroy();
  await s3?.close();
  rmSync(W, { recursive: true, force: true });
}, 60_000);

describe("streamed S3 unpack", () => {
  test("applied while downloaded, committed under the downloaded digests; the local copy reuses every layer", async () => {
    const f = await family("s1");
    const r = await unpack(ctx, { source: "s3://imgs/s1/", name: "s1" });
    expect(r.image.state).toBe("ready");
    expect(r.built).toBe(3);
    const rows = r.layers.map((l) => listLayers(ctx.db, ctx.cfg.pool).find((x) => x.chain_id === l.chain_id)!);
    expect(rows.map((l) => l.digest)).toEqual(f.blobs.map((b) => sha256(b)));
    expect(rows.every((l) => l.state === "committed" && !l.chain_id.startsWith("pending:"))).toBe(true);
    const want = { name: "s1\n", top: "s1 top\n", gone: false };
    expect(await filesOf("s1")).toMatchObject(want);
    // the same bytes from a local directory: same chain ids, nothing built
    const local = await unpack(ctx, { source: f.dir, name: "s1-local" });
    expect(local.built).toBe(0);
    expect(local.layers.map((l) => l.chain_id)).toEqual(r.layers.map((l) => l.chain_id));
  }, 240_000);

  test("a streamed layer whose bytes do not match the remembered digest fails dumb; the next run builds it", async () => {
    await family("s2");
    // the digest index names object 2's bytes (key, ETag, size) as something else
    const img = await resolveImage("s3://imgs/s2/", { stateDir: ctx.cfg.stateDir, env, lazyDigests: true });
    new BlobCache(ctx.cfg.stateDir).recordDigest(img.layers[1]!.lazy!.key, sha256("other bytes"), img.layers[1]!.size);
    const err = await unpack(ctx, { source: "s3://imgs/s2/", name: "s2" }).then(
      () => null,
      (e: unknown) => e as Error,
    );
    expect(err).toBeInstanceOf(ThinimgError);
    expect(err?.message).toContain("layer 2/3");
    expect(err?.message).toContain("digest mismatch");
    expect((err as ThinimgError).hint).toContain("left in place"); // nothing cleaned up: recorded for GC
    const failed = listLayers(ctx.db, ctx.cfg.pool).filter((l) => l.state === "failed");
    expect(failed.length).toBe(1);
    // the bad record was forgotten: a re-run learns the digest from the download and completes
    const r = await unpack(ctx, { source: "s3://imgs/s2/", name: "s2" });
    expect(r.image.state).toBe("ready");
    expect(await filesOf("s2")).toMatchObject({ name: "s2\n", top: "s2 top\n", gone: false });
  }, 240_000);

  test("an unpack killed -9 mid-stream (layer 2 downloading, its device mounted) is completed by a re-run", async () => {
    const f = await family("s3");
    const marker = join(W, "paused-s3");
    const p = Bun.spawn(["bun", "scripts/unpack.ts", "s3://imgs/s3/", "--name", "s3"], {
      cwd: ROOT,
      env: {
        ...(process.env as Record<string, string>),
        ...env,
        THINIMG_STATE_DIR: ctx.cfg.stateDir,
        THINIMG_POOL: ctx.cfg.pool,
        THINIMG_VIRTUAL_SIZE: "128M",
        THINIMG_TEST_PAUSE_AT: "layer:mounted#2",
        THINIMG_TEST_PAUSE_FILE: marker,
      },
      stdout: "pipe",
      stderr: "pipe",
    });
    const deadline = Date.now() + 120_000;
    while (!existsSync(marker)) {
      if (p.exitCode !== null || Date.now() > deadline) {
        p.kill(9);
        throw new Error(`never paused: ${(await new Response(p.stderr).text()).slice(-1500)}`);
      }
      await Bun.sleep(50);
    }
    p.kill(9);
    await p.exited;
    const r = await unpack(ctx, { source: "s3://imgs/s3/", name: "s3" });
    expect(r.image.state).toBe("ready");
    expect(r.reused).toBe(1); // layer 1 was committed before the kill
    expect(await filesOf("s3")).toMatchObject({ name: "s3\n", top: "s3 top\n", gone: false });
    const big = new Uint8Array(3 * 1024 * 1024).map((_, i) => (i * 7 + "s3".length) & 0xff);
    expect((await filesOf("s3")).blob).toBe(String(Bun.hash(big)));
    expect(f.blobs.length).toBe(3);
  }, 300_000);
});
