// Faults on the real kernel: the pool runs out of data space in the middle of a layer apply, and the
// data device under the pool starts failing I/O (dm-flakey) while a layer is being applied. Both must
// end in a clear one-line error naming GC, with NOTHING cleaned up (device still active, mount still
// there, thin id still allocated) and every leaked resource recorded in the DB.
// vm-seconds: 50 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import * as mnt from "../../lib/dm/mount.ts";
import type { ThinimgError } from "../../lib/errors.ts";
import { runOk } from "../../lib/exec.ts";
import { activate, release } from "../../lib/pipeline/activate.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { type Ctx, makeCtx } from "../../lib/pool/context.ts";
import { resetPausePoints } from "../../lib/pool/pause-points.ts";
import { listDevices } from "../../lib/store/devices.ts";
import { listLayers } from "../../lib/store/layers.ts";
import { listMounts } from "../../lib/store/mounts.ts";
import { getThinId } from "../../lib/store/thin-ids.ts";
import { type Leak, listWork, stepsOf } from "../../lib/store/work.ts";
import { noise } from "../helpers/bytes.ts";
import { acknowledgeKernelErrors, primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { type FlakyPool, makeFlakyPool, makeTestPool, type TestPool, unmountUnder } from "../helpers/pool.ts";

requireDm();

const W = mkdtempSync("/tmp/thinimg-faults-vm-");
const cleanups: (() => Promise<void>)[] = [];
const ctxs: Ctx[] = [];

afterAll(async () => {
  // test teardown only: the leaked mounts and devices the tests asserted on
  await unmountUnder(W);
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
      buildLayerTar([
        { path: "etc/", type: "dir" },
        { path: "etc/ok", content: "base" },
      ]),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/big.bin", content: noise(48 * 1024 * 1024, 7) },
      ]),
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

/** A pool whose data device is a dm target we can switch to failing (flakey) and back (linear). */
async function flakyPool(tag: string): Promise<FlakyPool> {
  const fk = await makeFlakyPool(join(W, tag), `fk${tag}${process.pid}`);
  cleanups.push(() => fk.destroy());
  return fk;
}

/** Run an in-process unpack that pauses at `at`; `during` runs while it is paused, then it goes on. */
async function unpackPausedAt(ctx: Ctx, at: string, tag: string, src: string, name: string, during: () => Promise<void>): Promise<unknown> {
  const marker = join(W, `${tag}-paused`);
  const cont = join(W, `${tag}-continue`);
  Object.assign(process.env, { THINIMG_TEST_PAUSE_AT: at, THINIMG_TEST_PAUSE_FILE: marker, THINIMG_TEST_PAUSE_CONTINUE: cont });
  resetPausePoints();
  try {
    const run = unpack(ctx, { source: src, name }).catch((e) => e as ThinimgError);
    while (!existsSync(marker)) await Bun.sleep(50);
    await during();
    writeFileSync(cont, "");
    return await run;
  } finally {
    for (const k of ["THINIMG_TEST_PAUSE_AT", "THINIMG_TEST_PAUSE_FILE", "THINIMG_TEST_PAUSE_CONTINUE"]) delete process.env[k];
  }
}

describe("I/O errors under a layer (dm-flakey data device)", () => {
  test("the apply fails with an I/O error; nothing cleaned up; everything recorded", async () => {
    const fk = await flakyPool("flaky");
    const name = fk.name;
    const ctx = await ctxFor("flaky", name);
    const src = join(W, "fl");
    writeLayerFamily(src, [
      buildLayerTar([
        { path: "etc/", type: "dir" },
        { path: "etc/ok", content: "base" },
      ]),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/file.bin", content: noise(8 * 1024 * 1024, 11) },
      ]),
    ]);
    // pause once layer 2 is mounted; break the data device; let the apply run into it
    try {
      const err = (await unpackPausedAt(ctx, "layer:mounted#2", "flaky", src, "fl", fk.fail)) as ThinimgError;
      expect(err).toBeInstanceOf(Error);
      expect(err.message).toMatch(/^layer 2\/2 /);
      await assertFailedDumb(ctx, err, "io");
      // the step that failed is recorded as failed, not left pending for "a dead process"
      const work = listWork(ctx.db, ctx.cfg.pool).find((w) => w.kind === "build_layer" && w.state === "failed")!;
      const steps = stepsOf(ctx.db, work.id);
      expect(steps.filter((s) => s.state === "pending")).toEqual([]);
      expect(steps.at(-1)).toMatchObject({ state: "failed" });
    } finally {
      // test teardown: make the device healthy again so the leaked mount can be unmounted
      await fk.heal().catch(() => {});
    }
  }, 300_000);

  test("a failed flush (sync -f) is never committed by a re-run: that attempt is rebuilt", async () => {
    const pool: TestPool = await makeTestPool({ dataSize: "256M" });
    cleanups.push(() => pool.destroy());
    const ctx = await ctxFor("flush", pool.name);
    const src = join(W, "fl2");
    const data = noise(8 * 1024 * 1024, 13);
    writeLayerFamily(src, [
      buildLayerTar([
        { path: "etc/", type: "dir" },
        { path: "etc/ok", content: "base" },
      ]),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/file.bin", content: data },
      ]),
    ]);
    // layer 2 is fully written to the page cache; then its device starts failing every I/O (an
    // `error` table swapped in under the mounted fs without freezing it, so nothing is flushed by
    // the swap), so the writeback in `sync -f` fails. The pool itself stays healthy.
    let dev = "";
    let table = "";
    const swap = async (t: string) => {
      await runOk(["dmsetup", "suspend", "--nolockfs", dev]);
      await runOk(["dmsetup", "reload", dev, "--table", t]);
      await runOk(["dmsetup", "resume", dev]);
    };
    let err: ThinimgError;
    try {
      err = (await unpackPausedAt(ctx, "layer:written#2", "flush", src, "fl2", async () => {
        dev = listLayers(ctx.db, ctx.cfg.pool).find((l) => l.state === "building")!.device_name!;
        table = (await dmsetup.table(dev)).trim();
        await swap(`0 ${table.split(" ")[1]} error`);
      })) as ThinimgError;
    } finally {
      if (table) await swap(table); // test teardown: the leaked mount must be unmountable
    }
    expect(err).toBeInstanceOf(Error);
    // the flush reported it (classified from sync's stderr), and the layer did NOT reach `applied`
    const layer = await assertFailedDumb(ctx, err, "io");
    expect(layer.phase).toBe("mounted");
    const work = listWork(ctx.db, ctx.cfg.pool).find((w) => w.kind === "build_layer" && w.state === "failed")!;
    expect(stepsOf(ctx.db, work.id).at(-1)).toMatchObject({ name: "sync", state: "failed" });
    // healthy again: once the operator acknowledged the kernel errors above, a re-run rebuilds layer
    // 2 on a new thin id
    await acknowledgeKernelErrors(ctx.cfg.stateDir);
    const r = await unpack(ctx, { source: src, name: "fl2" });
    expect(r.image.state).toBe("ready");
    expect(r.layers[1]!.thin_id).not.toBe(layer.thin_id);
    expect(getThinId(ctx.db, ctx.cfg.pool, layer.thin_id!)!.state).toBe("orphaned");
    // and the committed layer really has the bytes
    const a = await activate(ctx, "fl2");
    const dir = join(W, "fl2-check");
    mkdirSync(dir, { recursive: true });
    await mnt.mount(a.device_path, dir, { readOnly: true, options: ["noload"] });
    try {
      expect(Bun.hash(readFileSync(join(dir, "data/file.bin")))).toBe(Bun.hash(data));
    } finally {
      await runOk(["umount", dir]);
      await release(ctx, String(a.snapshot_id));
    }
  }, 300_000);
});
