// Faults on the real kernel: the pool runs out of data space in the middle of a layer apply, and the
// data device under the pool starts failing I/O (dm-flakey) while a layer is being applied. Both must
// end in a clear one-line error naming GC, with NOTHING cleaned up (device still active, mount still
// there, thin id still allocated) and every leaked resource recorded in the DB.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import * as losetup from "../../lib/dm/losetup.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { poolTable } from "../../lib/dm/pool.ts";
import type { ThinimgError } from "../../lib/errors.ts";
import { runOk } from "../../lib/exec.ts";
import { type Ctx, makeCtx } from "../../lib/pipeline/context.ts";
import { resetPausePoints } from "../../lib/pipeline/pause.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { listDevices } from "../../lib/store/devices.ts";
import { listLayers } from "../../lib/store/layers.ts";
import { listMounts } from "../../lib/store/mounts.ts";
import { type Leak, listWork } from "../../lib/store/work.ts";
import { buildLayerTar, writeLayerFamily } from "../helpers/images.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { requireDm } from "../helpers/kernel.ts";
import { type TestPool, makeTestPool } from "../helpers/pool.ts";

requireDm();

const W = mkdtempSync("/tmp/thinimg-faults-vm-");
const cleanups: (() => Promise<void>)[] = [];
const ctxs: Ctx[] = [];

afterAll(async () => {
  // test teardown only: the leaked mounts and devices the tests asserted on
  for (const m of mnt.mountinfo().filter((e) => e.mountPoint.startsWith(W))) await runOk(["umount", m.mountPoint]).catch(() => {});
  for (const c of ctxs) c.db.close();
  for (const c of cleanups.reverse()) await c().catch(() => {});
  rmSync(W, { recursive: true, force: true });
}, 120_000);

async function ctxFor(tag: string, poolName: string): Promise<Ctx> {
  const stateDir = join(W, `state-${tag}`);
  // earlier fault tests in this VM left kernel errors: start this state dir's dmesg cursor after them
  await primeKernelLogCursor(stateDir);
  const ctx = makeCtx(loadConfig({ stateDir, pool: poolName, virtualSize: "512M", wait: "30s" }, {}), { command: `faults ${tag}` });
  ctxs.push(ctx);
  return ctx;
}

/** Incompressible bytes (xorshift). */
function noise(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
    out[i + 1] = (x >>> 8) & 0xff;
    out[i + 2] = (x >>> 16) & 0xff;
    out[i + 3] = (x >>> 24) & 0xff;
  }
  return out;
}

/** Everything recorded about a failed unpack, and whether its resources are really still there. */
async function assertFailedDumb(ctx: Ctx, err: ThinimgError, errorKind: string) {
  expect(err.hint).toContain("bun scripts/gc.ts");
  expect(err.hint).toContain("nothing was cleaned up");
  const failed = listLayers(ctx.db, ctx.cfg.pool).filter((l) => l.state === "failed");
  expect(failed).toHaveLength(1);
  const layer = failed[0]!;
  process.stderr.write(`[faults] the user sees: error: ${err.oneLine()}\n`);
  expect(layer.error_kind).toBe(errorKind);
  const work = listWork(ctx.db, ctx.cfg.pool).filter((w) => w.kind === "build_layer" && w.state === "failed");
  expect(work).toHaveLength(1);
  const leaks = JSON.parse(work[0]!.leaks!) as Leak[];
  const path = join(ctx.cfg.mountDir, layer.device_name!);
  expect(leaks.map((l) => `${l.kind}:${l.ref}`).sort()).toEqual([`device:${layer.device_name}`, `mount:${path}`, `thin_id:${layer.thin_id}`].sort());
  // fail dumb: nothing was unmounted or removed
  expect(await dmsetup.exists(layer.device_name!)).toBe(true);
  expect(mnt.mountinfo().some((m) => m.mountPoint === path)).toBe(true);
  expect(listDevices(ctx.db, ctx.cfg.pool).find((d) => d.name === layer.device_name)!.state).toBe("leaked");
  expect(listMounts(ctx.db, ctx.cfg.pool).find((m) => m.path === path)!.state).toBe("leaked");
  return layer;
}

describe("pool out of data space mid-apply", () => {
  test("clear error, nothing cleaned up, everything recorded; the next run is blocked by health", async () => {
    const pool: TestPool = await makeTestPool({ dataSize: "32M" });
    cleanups.push(() => pool.destroy());
    const ctx = await ctxFor("nospace", pool.name);
    const src = join(W, "big");
    writeLayerFamily(src, [
      buildLayerTar([{ path: "etc/", type: "dir" }, { path: "etc/ok", content: "base" }]),
      buildLayerTar([{ path: "data/", type: "dir" }, { path: "data/big.bin", content: noise(48 * 1024 * 1024, 7) }]),
    ]);
    const err = (await unpack(ctx, { source: src, name: "big" }).catch((e) => e)) as ThinimgError;
    expect(err.kind).toBe("dm");
    expect(err.message).toMatch(/^layer 2\/2 .*: pool tp\w+ ran out of data space/);
    await assertFailedDumb(ctx, err, "no_space");
    const st = (await dmsetup.status(pool.name)).split(" ");
    expect(st).toContain("out_of_data_space");
    // a re-run does not pile more work on a full pool: the health checks stop it before dm work
    const again = (await unpack(ctx, { source: src, name: "big" }).catch((e) => e)) as ThinimgError;
    expect(again.kind).toBe("unhealthy");
    expect(listLayers(ctx.db, ctx.cfg.pool).filter((l) => l.state === "failed")).toHaveLength(1);
  }, 300_000);
});

describe("I/O errors under a layer (dm-flakey data device)", () => {
  test("the apply fails with an I/O error; nothing cleaned up; everything recorded", async () => {
    // A pool whose data device is a dm target we can switch to failing mid-run.
    const dir = join(W, "flaky");
    Bun.spawnSync(["mkdir", "-p", dir]);
    await runOk(["truncate", "-s", "16M", join(dir, "meta")]);
    await runOk(["truncate", "-s", "512M", join(dir, "data")]);
    const metaDev = await losetup.attach(join(dir, "meta"));
    const dataDev = await losetup.attach(join(dir, "data"));
    const name = `fk${process.pid}`;
    const flaky = `${name}-data`;
    const sectors = (512 * 1024 * 1024) / 512;
    await dmsetup.create(flaky, `0 ${sectors} linear ${dataDev} 0`);
    await dmsetup.create(name, poolTable({ metaDev, dataDev: `/dev/mapper/${flaky}`, dataSectors: sectors, blockSectors: 128, lowWaterMark: 64, features: ["error_if_no_space"] }));
    cleanups.push(async () => {
      for (const d of await dmsetup.ls()) if (d.name.startsWith(`thinimg-${name}-`)) await dmsetup.remove(d.name).catch(() => {});
      await dmsetup.remove(name).catch(() => {});
      await dmsetup.remove(flaky).catch(() => {});
      await losetup.detach(metaDev).catch(() => {});
      await losetup.detach(dataDev).catch(() => {});
    });
    const ctx = await ctxFor("flaky", name);
    const src = join(W, "fl");
    writeLayerFamily(src, [
      buildLayerTar([{ path: "etc/", type: "dir" }, { path: "etc/ok", content: "base" }]),
      buildLayerTar([{ path: "data/", type: "dir" }, { path: "data/file.bin", content: noise(8 * 1024 * 1024, 11) }]),
    ]);
    // pause once layer 2 is mounted; break the data device; let the apply run into it
    const marker = join(W, "flaky-paused");
    const cont = join(W, "flaky-continue");
    Object.assign(process.env, { THINIMG_TEST_PAUSE_AT: "layer:mounted#2", THINIMG_TEST_PAUSE_FILE: marker, THINIMG_TEST_PAUSE_CONTINUE: cont });
    resetPausePoints();
    try {
      const run = unpack(ctx, { source: src, name: "fl" }).catch((e) => e as ThinimgError);
      while (!existsSync(marker)) await Bun.sleep(50);
      // flakey with up 0 s / down 1 s: every I/O to the data device fails from now on
      await dmsetup.reload(flaky, `0 ${sectors} flakey ${dataDev} 0 0 1`);
      await dmsetup.resume(flaky);
      writeFileSync(cont, "");
      const err = (await run) as ThinimgError;
      expect(err).toBeInstanceOf(Error);
      expect(err.message).toMatch(/^layer 2\/2 /);
      await assertFailedDumb(ctx, err, "io");
    } finally {
      for (const k of ["THINIMG_TEST_PAUSE_AT", "THINIMG_TEST_PAUSE_FILE", "THINIMG_TEST_PAUSE_CONTINUE"]) delete process.env[k];
      // test teardown: make the device healthy again so the leaked mount can be unmounted
      await dmsetup.reload(flaky, `0 ${sectors} linear ${dataDev} 0`).catch(() => {});
      await dmsetup.resume(flaky).catch(() => {});
    }
  }, 300_000);
});
