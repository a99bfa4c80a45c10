// GC against the real dm-thin kernel, with leaks made for real on a loop-backed pool and a real
// state DB: hand-made thin ids, released snapshots, failed activations, a failed layer build left
// mounted in our mount dir, a DB row deleted by hand, a device of ours nobody recorded, a device
// with no table. Next to them: live layers/snapshots (must stay byte-identical), a mounted orphan
// (skipped), a foreign device (untouched), a too-young orphan (left for later). `bun scripts/gc.ts`
// runs as a user would run it.
// vm-seconds: 210 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { pool as dmpool, dmsetup, mkfsExt4, mount } from "../../lib/dm/index.ts";
import { run, runOk } from "../../lib/exec.ts";
import { act } from "../../lib/gc/act.ts";
import type { GcReport } from "../../lib/gc/report.ts";
import { type Db, openDb } from "../../lib/store/db.ts";
import { getDevice, setDevice, setDeviceState } from "../../lib/store/devices.ts";
import { recordFirstSeen } from "../../lib/store/gc-queries.ts";
import { beginImage, markImageReady } from "../../lib/store/images.ts";
import { insertLayer, updateLayer } from "../../lib/store/layers.ts";
import { getMount, setMount } from "../../lib/store/mounts.ts";
import { insertSnapshot, updateSnapshot } from "../../lib/store/snapshots.ts";
import { allocateThinId, getThinId, setThinIdState } from "../../lib/store/thin-ids.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { requireDm } from "../helpers/kernel.ts";
import { once } from "../helpers/once.ts";
import { makeTestPool, type TestPool } from "../helpers/pool.ts";

requireDm();
setDefaultTimeout(180_000);

const MiB = 1024 ** 2;
const VSIZE = 256 * MiB;
const HOUR = 3_600_000;

let p: TestPool;
let stateDir: string;
let db: Db;
let mountDir: string;
const pre = () => `thinimg-${p.name}-`;
const nm = (kind: "layer" | "snap", id: number) => `${pre()}${kind}-${id}`;
const dev = (name: string) => dmsetup.mapperPath(name);
const sh = (argv: string[]) => runOk(argv, { timeoutMs: 60_000 });

async function gc(...args: string[]): Promise<{ code: number; r: GcReport; stderr: string }> {
  const proc = Bun.spawn(["bun", "scripts/gc.ts", "--json", "--pool", p.name, "--state-dir", stateDir, ...args], { stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  let r: GcReport;
  try {
    r = JSON.parse(out) as GcReport;
  } catch {
    throw new Error(`gc ${args.join(" ")}: exit ${code}, no JSON report\nstdout: ${out}\nstderr: ${err}`);
  }
  return { code, r, stderr: err };
}

const thinIds = () => p.thinIds();

/** The operator, having read what the kernel logged: `health` (records it), then `health --ack`. */
async function ackKernelErrors(): Promise<void> {
  for (const extra of [[], ["--ack"]]) {
    const h = Bun.spawn(["bun", "scripts/health.ts", "--pool", p.name, "--state-dir", stateDir, ...extra], { stdout: "ignore", stderr: "ignore" });
    await h.exited;
  }
}

async function dataUsed(): Promise<number> {
  const s = await dmpool.poolStatusOk(p.name);
  return s.dataUsed;
}

/** Pool data use once it reaches `want` or stops changing (metadata commits are periodic). */
async function settledDataUsed(want: number): Promise<number> {
  let last = -1;
  for (let i = 0; i < 50; i++) {
    const d = await dataUsed();
    if (d === want || (d === last && i > 10)) return d;
    last = d;
    await Bun.sleep(100);
  }
  return last;
}

/** Random data straight onto a device (4 MiB at 16 MiB): makes a leak cost real pool blocks. */
const scribble = (name: string) => sh(["dd", "if=/dev/urandom", `of=${dev(name)}`, "bs=1M", "count=4", "seek=16", "oflag=direct", "conv=fsync", "status=none"]);

const sha = async (path: string) => new Bun.CryptoHasher("sha256").update(await Bun.file(path).arrayBuffer()).digest("hex");

// ids of what we make
const ids = {} as Record<string, number>;
const names = {} as Record<string, string>;
let imageId = 0;
let layer1 = 0;
let liveLayerHash = "";
let liveSnapHash = "";
let foreignMnt = "";
let foreignHash = "";
/** sha256 of the foreign device's first 32 MiB (where scribble() wrote). */
const foreignSha = async () => {
  const r = await runOk(["sh", "-c", `head -c ${32 * MiB} ${dev(names.foreign!)} | sha256sum`], { timeoutMs: 60_000 });
  return r.stdout.split(" ")[0]!;
};
let baseline = 0;

/** allocate in the ledger, create in the pool, record 'created' — the pipeline's order */
async function ledgerThin(owner: { kind: "layer" | "snapshot"; id: number }, origin: number | null): Promise<number> {
  const id = allocateThinId(db, p.name, owner, origin);
  if (origin === null) await dmpool.createThin(p.name, id);
  else await dmpool.createSnap(p.name, id, origin);
  setThinIdState(db, p.name, id, "created");
  return id;
}

async function snapshot(o: { activate: boolean }): Promise<{ snapId: number; thinId: number; name: string }> {
  const s = insertSnapshot(db, { pool: p.name, imageId, layerId: layer1, virtualSize: 64 * 1024 * 1024, pid: process.pid, command: "gc test" });
  const thinId = await ledgerThin({ kind: "snapshot", id: s.id }, ids.layer1!);
  const name = nm("snap", thinId);
  updateSnapshot(db, s.id, { thin_id: thinId, device_name: name });
  if (o.activate) {
    setDevice(db, { pool: p.name, name, thinId, kind: "snap", state: "activating" });
    await dmpool.activateThin(p.name, name, thinId, VSIZE);
    setDeviceState(db, p.name, name, "active");
  }
  return { snapId: s.id, thinId, name };
}

beforeAll(async () => {
  p = await makeTestPool({ dataSize: "512M", metaSize: "16M" });
  stateDir = mkdtempSync("/tmp/thinimg-gc-state-");
  await primeKernelLogCursor(stateDir);
  const cfg = loadConfig({ stateDir, pool: p.name });
  mountDir = cfg.mountDir;
  db = openDb(cfg.dbPath);
  const tmpMnt = join(stateDir, "verify");
  mkdirSync(tmpMnt, { recursive: true });

  // ---- live: a committed base layer with files, an image, an active snapshot with its own file ----
  const L1 = insertLayer(db, {
    pool: p.name,
    chainId: "sha256:l1",
    parentId: null,
    parentChainId: null,
    identity: "sha256:l1",
    diffId: null,
    digest: "sha256:l1",
    size: 1,
    virtualSize: VSIZE,
  });
  layer1 = L1.id;
  ids.layer1 = await ledgerThin({ kind: "layer", id: L1.id }, null);
  names.layer1 = nm("layer", ids.layer1);
  setDevice(db, { pool: p.name, name: names.layer1, thinId: ids.layer1, kind: "layer", state: "activating" });
  await dmpool.activateThin(p.name, names.layer1, ids.layer1, VSIZE);
  await mkfsExt4(dev(names.layer1));
  await mount.mount(dev(names.layer1), tmpMnt);
  await sh(["dd", "if=/dev/urandom", `of=${tmpMnt}/layer.bin`, "bs=1M", "count=3", "status=none"]);
  liveLayerHash = await sha(`${tmpMnt}/layer.bin`);
  await mount.umount(tmpMnt);
  await dmsetup.remove(names.layer1);
  setDeviceState(db, p.name, names.layer1, "removed");
  updateLayer(db, L1.id, { thin_id: ids.layer1, device_name: names.layer1, state: "committed", phase: "committed", committed_at: Date.now() });
  setThinIdState(db, p.name, ids.layer1, "committed");
  const img = beginImage(db, { pool: p.name, name: "live", source: "/dev/null", format: "layer-family" });
  imageId = img.id;
  markImageReady(db, img.id, { format: "layer-family", config: null, layerIds: [L1.id], topChainId: "sha256:l1" });

  const live = await snapshot({ activate: true });
  ids.liveSnap = live.thinId;
  names.liveSnap = live.name;
  await mount.mount(dev(live.name), tmpMnt);
  await sh(["dd", "if=/dev/urandom", `of=${tmpMnt}/vm.bin`, "bs=1M", "count=2", "status=none"]);
  liveSnapHash = await sha(`${tmpMnt}/vm.bin`);
  await mount.umount(tmpMnt);
  updateSnapshot(db, live.snapId, { state: "active", activated_at: Date.now() });
  setThinIdState(db, p.name, live.thinId, "committed");

  // ---- left alone: a mounted orphan, a foreign device, a too-young orphan ----
  const mo = await snapshot({ activate: true });
  ids.mounted = mo.thinId;
  names.mounted = mo.name;
  foreignMnt = mkdtempSync("/tmp/thinimg-gc-elsewhere-");
  await mount.mount(dev(mo.name), foreignMnt, { readOnly: true });
  updateSnapshot(db, mo.snapId, { state: "failed", error: "test: failed activation, then mounted by someone" });
  setThinIdState(db, p.name, mo.thinId, "orphaned", "activation failed");
  setDeviceState(db, p.name, mo.name, "leaked", "activation failed");

  ids.foreign = 400;
  names.foreign = `fx${process.pid}-disk`;
  await dmsetup.message(p.name, "create_thin 400");
  await dmpool.activateThin(p.name, names.foreign, 400, VSIZE);
  await scribble(names.foreign);
  foreignHash = await foreignSha();

  const young = await snapshot({ activate: false });
  ids.young = young.thinId;

  // pool data use before the collectable leaks: GC must bring it back to exactly this
  baseline = await dataUsed();

  // ---- collectable leaks (their DB rows are aged past the grace period below) ----
  // hand-made thin id with data, not in the DB
  ids.hand = 500;
  await dmsetup.message(p.name, "create_thin 500");
  await dmpool.activateThin(p.name, `tmp${process.pid}`, 500, VSIZE);
  await scribble(`tmp${process.pid}`);
  await dmsetup.remove(`tmp${process.pid}`);

  // released snapshot (device removed by release; its thin id is GC's)
  const rel = await snapshot({ activate: true });
  ids.released = rel.thinId;
  await scribble(rel.name);
  await dmsetup.remove(rel.name);
  setDeviceState(db, p.name, rel.name, "removed");
  updateSnapshot(db, rel.snapId, { state: "released", released_at: Date.now() });
  setThinIdState(db, p.name, rel.thinId, "orphaned", `snapshot ${rel.snapId} released`);

  // failed activation: device left active (fail dumb)
  const fa = await snapshot({ activate: true });
  ids.failedAct = fa.thinId;
  names.failedAct = fa.name;
  await scribble(fa.name);
  updateSnapshot(db, fa.snapId, { state: "failed", error: "test: activation failed" });
  setThinIdState(db, p.name, fa.thinId, "orphaned", "activation failed");
  setDeviceState(db, p.name, fa.name, "leaked", "activation failed");

  // failed layer build: upper layer, left active AND mounted in our mount dir
  const L2 = insertLayer(db, {
    pool: p.name,
    chainId: "sha256:l2",
    parentId: L1.id,
    parentChainId: "sha256:l1",
    identity: "sha256:l2",
    diffId: null,
    digest: "sha256:l2",
    size: 1,
    virtualSize: VSIZE,
  });
  ids.failedLayer = await ledgerThin({ kind: "layer", id: L2.id }, ids.layer1);
  names.failedLayer = nm("layer", ids.failedLayer);
  updateLayer(db, L2.id, { thin_id: ids.failedLayer, device_name: names.failedLayer, phase: "created" });
  setDevice(db, { pool: p.name, name: names.failedLayer, thinId: ids.failedLayer, kind: "layer", state: "active" });
  await dmpool.activateThin(p.name, names.failedLayer, ids.failedLayer, VSIZE);
  const l2mnt = join(mountDir, names.failedLayer);
  mkdirSync(l2mnt, { recursive: true });
  await mount.mount(dev(names.failedLayer), l2mnt, { options: ["nosuid", "nodev"] });
  setMount(db, { path: l2mnt, pool: p.name, deviceName: names.failedLayer, thinId: ids.failedLayer, purpose: "apply", state: "mounted" });
  await sh(["dd", "if=/dev/urandom", `of=${l2mnt}/half-applied.bin`, "bs=1M", "count=4", "conv=fsync", "status=none"]);
  updateLayer(db, L2.id, { state: "failed", phase: "mounted", error: "test: layer apply failed", error_kind: "policy" });
  setDeviceState(db, p.name, names.failedLayer, "leaked", "layer build failed");
  setMount(db, {
    path: l2mnt,
    pool: p.name,
    deviceName: names.failedLayer,
    thinId: ids.failedLayer,
    purpose: "apply",
    state: "leaked",
    reason: "layer build failed",
  });

  // a snapshot whose DB row was deleted by hand
  const gone = await snapshot({ activate: true });
  ids.rowDeleted = gone.thinId;
  names.rowDeleted = gone.name;
  await scribble(gone.name);
  updateSnapshot(db, gone.snapId, { state: "active", activated_at: Date.now() });
  setThinIdState(db, p.name, gone.thinId, "committed");
  db.query("DELETE FROM snapshots WHERE id = ?").run(gone.snapId);

  // a device with our name nobody recorded, and one with no table at all
  ids.unrecorded = 600;
  names.unrecorded = nm("snap", 600);
  await dmsetup.message(p.name, "create_thin 600");
  await dmpool.activateThin(p.name, names.unrecorded, 600, VSIZE);
  await scribble(names.unrecorded);
  names.tableless = nm("snap", 700);
  await sh(["dmsetup", "--noudevsync", "create", "--notable", names.tableless]);

  // every row is an hour old, except the young orphan, released just now
  const old = Date.now() - HOUR;
  for (const t of ["thin_ids", "snapshots", "layers", "devices", "mounts"]) db.query(`UPDATE ${t} SET updated_at = ?`).run(old);
  // the ids the DB never knew were first seen by an earlier --force run, an hour ago
  recordFirstSeen(db, p.name, [500, 600], old);
  updateSnapshot(db, young.snapId, { state: "released", released_at: Date.now() });
  setThinIdState(db, p.name, young.thinId, "orphaned", "released just now");
});

afterAll(async () => {
  await run(["umount", foreignMnt]);
  await run(["umount", join(mountDir ?? "/nonexistent", names.failedLayer ?? "x")]);
  db?.close();
  await p?.destroy();
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
  if (foreignMnt) rmSync(foreignMnt, { recursive: true, force: true });
});

const key = (o: { thin_id: number | null; device: string | null }) => `${o.thin_id}/${o.device}`;

// The leak scenario's GC runs, in order (helpers/once.ts).
const dryRun = once(async () => {
  const before = await thinIds();
  const devsBefore = (await dmsetup.infoAll()).map((d) => d.name).sort();
  const { code, r } = await gc();
  const after = { thinIds: await thinIds(), devs: (await dmsetup.infoAll()).map((d) => d.name).sort(), heldRoot: (await dmpool.poolStatusOk(p.name)).heldRoot };
  return { before, devsBefore, code, r, after };
});
const firstForce = once(async () => {
  await dryRun();
  return gc("--force");
});
const secondForce = once(async () => {
  await firstForce();
  return gc("--force");
});
const afterUnmount = once(async () => {
  await secondForce();
  await mount.umount(foreignMnt);
  return gc("--force");
});
/** The last run of the scenario: every leak collected, the pool as clean as the baseline. */
const graceZero = once(async () => {
  await afterUnmount();
  return gc("--force", "--grace", "0");
});

describe("gc on real leaks", () => {
  test("dry-run lists exactly the leaks, with their reasons, and changes nothing", async () => {
    const { before, devsBefore, code, r, after } = await dryRun();
    expect(r.mode).toBe("dry_run");
    expect(r.scan.metadata_status).toBe("ok");
    expect(r.scan.metadata_method).toBe("thin_ls");
    expect(Object.fromEntries(r.orphans.map((o) => [key(o), o.reason]))).toEqual({
      [`${ids.failedLayer}/${names.failedLayer}`]: "db_failed",
      [`${ids.failedAct}/${names.failedAct}`]: "db_failed",
      [`${ids.rowDeleted}/${names.rowDeleted}`]: "owner_missing",
      [`600/${names.unrecorded}`]: "not_in_db",
      [`null/${names.tableless}`]: "no_table",
      [`${ids.released}/null`]: "db_released",
      "500/null": "not_in_db",
    });
    expect(r.orphans.every((o) => o.outcome === "would_remove")).toBe(true);
    // the exact commands, our own mount first
    const fl = r.orphans.find((o) => o.device === names.failedLayer)!;
    expect(fl.commands).toEqual([
      `umount ${join(mountDir, names.failedLayer!)}`,
      `dmsetup remove ${names.failedLayer}`,
      `dmsetup message ${p.name} 0 "delete ${ids.failedLayer}"`,
    ]);
    expect(r.orphans.find((o) => o.device === names.tableless)!.commands).toEqual([`dmsetup remove ${names.tableless}`]);
    expect(Object.fromEntries(r.skipped.map((s) => [`${s.thin_id}`, s.reason]))).toEqual({
      [`${ids.mounted}`]: "mounted",
      "400": "foreign",
      [`${ids.young}`]: "too_young",
    });
    expect(r.foreign.map((f) => f.name)).toEqual([names.foreign!]);
    // the mounted orphan needs a human: exit 1 even in a dry-run
    expect(code).toBe(1);
    expect(r.summary.needs_human).toBe(true);
    // nothing changed: same thin ids, same devices, no stale hold, DB untouched
    expect(after.thinIds).toEqual(before);
    expect(after.devs).toEqual(devsBefore);
    expect(after.heldRoot).toBeNull();
    expect(getThinId(db, p.name, ids.released!)!.state).toBe("orphaned");
    expect(getThinId(db, p.name, 500)).toBeNull();
  });

  test("human output says the same thing", async () => {
    await dryRun(); // and before any --force
    const proc = Bun.spawn(["bun", "scripts/gc.ts", "--pool", p.name, "--state-dir", stateDir], { stdout: "pipe", stderr: "pipe" });
    const out = await new Response(proc.stdout).text();
    await proc.exited;
    expect(out).toContain("would remove 7 orphan(s)");
    expect(out).toContain(`dmsetup message ${p.name} 0 "delete 500"`);
    expect(out).toContain("[needs a human]");
    expect(out).toContain(`foreign (never touched) (1):`);
  });

  test("--force removes exactly them; live data intact; pool use back to the baseline", async () => {
    const { r: dry, before } = await dryRun();
    // what the leaks mapped (shared blocks included: the failed layer is a snapshot of a live one)
    const leakBlocks = dry.orphans.reduce((n, o) => n + (o.mapped_bytes ?? 0), 0);
    expect(leakBlocks).toBeGreaterThan(20 * MiB); // 5 leaks × 4 MiB + the layer's fs and file
    const { code, r } = await firstForce();
    expect(r.mode).toBe("force");
    expect(r.lock.status).toBe("acquired");
    expect(r.health?.ok).toBe(true);
    expect(r.orphans.map((o) => [key(o), o.outcome]).sort()).toEqual(dry.orphans.map((o) => [key(o), "done"]).sort());
    expect(code).toBe(1); // the mounted orphan still needs a human
    const after = await thinIds();
    const removed = [500, 600, ids.released!, ids.failedAct!, ids.failedLayer!, ids.rowDeleted!];
    expect(after).toEqual(before.filter((i) => !removed.includes(i)));
    for (const n of [names.failedAct, names.failedLayer, names.rowDeleted, names.unrecorded, names.tableless]) expect(await dmsetup.info(n!)).toBeNull();
    // untouched: live snapshot, mounted orphan, foreign device and its id, the young orphan
    for (const n of [names.liveSnap, names.mounted, names.foreign]) expect(await dmsetup.info(n!)).not.toBeNull();
    for (const i of [ids.layer1, ids.liveSnap, ids.mounted, 400, ids.young]) expect(after).toContain(i!);
    expect(mount.mountinfo().some((m) => m.mountPoint === foreignMnt)).toBe(true);
    expect(mount.mountinfo().some((m) => m.mountPoint === join(mountDir, names.failedLayer!))).toBe(false);
    // ledger: deleted only once the pool confirmed; unknown ids recorded as deleted
    for (const i of removed) expect(getThinId(db, p.name, i)?.state).toBe("deleted");
    expect(getDevice(db, p.name, names.failedAct!)?.state).toBe("removed");
    expect(getMount(db, join(mountDir, names.failedLayer!))?.state).toBe("unmounted");
    // data use: every block the leaks held is free again (the pool commits within a second)
    expect(r.summary.mapped_bytes).toBe(leakBlocks);
    expect(await settledDataUsed(baseline)).toBe(baseline);
  });

  test("live layer and snapshot files are unchanged", async () => {
    await firstForce();
    const m = mkdtempSync("/tmp/thinimg-gc-verify-");
    try {
      await mount.mount(dev(names.liveSnap!), m, { readOnly: true });
      expect(await sha(`${m}/vm.bin`)).toBe(liveSnapHash);
      expect(await sha(`${m}/layer.bin`)).toBe(liveLayerHash);
      await mount.umount(m);
      // the committed layer itself, through a short-lived read-only activation
      const v = `verify${process.pid}`;
      await dmpool.activateThin(p.name, v, ids.layer1!, VSIZE, { readOnly: true });
      await mount.mount(dev(v), m, { readOnly: true });
      expect(await sha(`${m}/layer.bin`)).toBe(liveLayerHash);
      await mount.umount(m);
      await dmsetup.remove(v);
    } finally {
      await run(["umount", m]);
      rmSync(m, { recursive: true, force: true });
    }
  });

  test("a second --force finds nothing new", async () => {
    const { r } = await secondForce();
    expect(r.orphans).toEqual([]);
    expect(r.skipped.map((s) => s.reason).sort()).toEqual(["foreign", "mounted", "too_young"]);
    expect(await settledDataUsed(baseline)).toBe(baseline);
  });

  test("once unmounted, the skipped orphan goes too; the foreign device never does", async () => {
    const { code, r } = await afterUnmount();
    expect(r.orphans.map((o) => [key(o), o.outcome])).toEqual([[`${ids.mounted}/${names.mounted}`, "done"]]);
    expect(code).toBe(0);
    expect(await dmsetup.info(names.foreign!)).not.toBeNull();
    expect(await thinIds()).toContain(400);
    expect(await foreignSha()).toBe(foreignHash); // the foreign device's data, byte for byte
    expect(await thinIds()).not.toContain(ids.mounted!);
    expect(await dmsetup.info(names.mounted!)).toBeNull();
  });

  test("--grace 0 takes the young orphan too", async () => {
    const { r } = await graceZero();
    expect(r.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[ids.young ?? -1, "db_released", "done"]]);
    expect((await thinIds()).includes(ids.young!)).toBe(false);
  });
});

describe("locks and a stale metadata hold", () => {
  // each test starts from a pool without leaks (the scenario above collected them all)
  beforeAll(async () => {
    await graceZero();
  });

  test("a held process lock: --force refuses and changes nothing; --ignore-lock acts, with a warning", async () => {
    await dmsetup.message(p.name, "create_thin 800");
    const holder = Bun.spawn(
      [
        "bun",
        "-e",
        `import { acquireProcessLock } from "./lib/lock/process-lock.ts";
         await acquireProcessLock(${JSON.stringify(join(stateDir, "thinimg.lock"))}, { waitMs: 0, command: "bun scripts/unpack.ts (test holder)" });
         console.log("locked"); await Bun.sleep(120000);`,
      ],
      { stdout: "pipe", stderr: "inherit" },
    );
    try {
      const reader = holder.stdout.getReader();
      const { value } = await reader.read();
      expect(new TextDecoder().decode(value)).toContain("locked");
      const refused = await gc("--force", "--wait", "0");
      expect(refused.code).toBe(1);
      expect(refused.r.refused?.reason).toBe("lock_held");
      expect(refused.r.lock.holder).toContain("test holder");
      expect(refused.r.orphans).toEqual([]);
      expect(await thinIds()).toContain(800);
      // dry-run needs no lock and still sees it
      expect((await gc("--grace", "0")).r.orphans.map((o) => o.thin_id)).toEqual([800]);
      // --ignore-lock does not bypass the health checks: a read-only pool blocks it, nothing is done
      const pt = dmpool.parsePoolTable(await dmsetup.table(p.name));
      const params = {
        metaDev: p.metaDev,
        dataDev: p.dataDev,
        dataSectors: pt.dataSectors,
        blockSectors: pt.blockSectors,
        lowWaterMark: pt.lowWaterMark,
        features: pt.features,
      };
      await dmsetup.reload(p.name, dmpool.poolTable({ ...params, features: [...pt.features, "read_only"] }));
      await dmsetup.resume(p.name);
      let blocked: Awaited<ReturnType<typeof gc>>;
      try {
        blocked = await gc("--force", "--ignore-lock", "--grace", "0");
      } finally {
        await dmsetup.reload(p.name, dmpool.poolTable(params));
        await dmsetup.resume(p.name);
      }
      expect(blocked.r.lock.status).toBe("ignored");
      expect(blocked.r.refused?.reason).toBe("unhealthy");
      expect(blocked.r.health?.ok).toBe(false);
      expect(blocked.code).toBe(1);
      expect(await thinIds()).toContain(800);
      await ackKernelErrors();
      const forced = await gc("--force", "--ignore-lock", "--grace", "0");
      expect(forced.r.lock.status).toBe("ignored");
      expect(forced.stderr).toContain("--ignore-lock");
      expect(forced.r.orphans.map((o) => [o.thin_id, o.outcome])).toEqual([[800, "done"]]);
      expect(await thinIds()).not.toContain(800);
    } finally {
      holder.kill(9);
      await holder.exited;
    }
  });

  test("a metadata snapshot left held: dry-run reports it and does not guess; --force releases it and collects", async () => {
    await dmsetup.message(p.name, "create_thin 801");
    await dmpool.reserveMetadataSnap(p.name);
    const held = (await dmpool.poolStatusOk(p.name)).heldRoot;
    expect(held).not.toBeNull();
    const dry = await gc("--grace", "0");
    expect(dry.code).toBe(1);
    expect(dry.r.scan.stale_metadata_hold).toEqual({ held_root: held!, released: false });
    expect(dry.r.orphans).toEqual([]);
    expect((await dmpool.poolStatusOk(p.name)).heldRoot).toBe(held);
    const forced = await gc("--force", "--grace", "0");
    expect(forced.r.scan.stale_metadata_hold).toEqual({ held_root: held!, released: true });
    expect(forced.r.orphans.map((o) => [o.thin_id, o.outcome])).toEqual([[801, "done"]]);
    expect(forced.code).toBe(0);
    expect((await dmpool.poolStatusOk(p.name)).heldRoot).toBeNull();
  });

  test("SIGTERM mid-run: the current step finishes, the rest is left for the next run, the lock is released", async () => {
    const ids20 = Array.from({ length: 20 }, (_, i) => 810 + i);
    for (const i of ids20) await dmsetup.message(p.name, `create_thin ${i}`);
    const cmdLog = join(stateDir, "cmd-sigterm.jsonl");
    const proc = Bun.spawn(["bun", "scripts/gc.ts", "--json", "--force", "--grace", "0", "--pool", p.name, "--state-dir", stateDir], {
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, THINIMG_CMD_LOG: cmdLog },
    });
    const out = new Response(proc.stdout).text();
    for (let i = 0; i < 1200 && !(existsSync(cmdLog) && readFileSync(cmdLog, "utf8").includes("delete 810")); i++) await Bun.sleep(50);
    proc.kill("SIGTERM");
    const code = await proc.exited;
    const r = JSON.parse(await out) as GcReport;
    expect(r.stopped?.reason).toBe("aborted");
    const done = r.orphans.filter((o) => o.outcome === "done").length;
    expect(done).toBeGreaterThanOrEqual(1);
    expect(r.summary.not_run).toBe(20 - done);
    expect(code).toBe(1);
    expect(existsSync(join(stateDir, "thinimg.lock"))).toBe(false);
    expect((await dmpool.poolStatusOk(p.name)).heldRoot).toBeNull();
    const left = (await thinIds()).filter((i) => ids20.includes(i));
    expect(left.length).toBe(20 - done);
    const next = await gc("--force", "--grace", "0");
    expect(next.r.orphans.map((o) => o.thin_id)).toEqual(left);
    expect(next.r.summary.removed).toBe(left.length);
  });

  test("a pool that is not rw: --force refuses (health) and act() stops before touching anything", async () => {
    await dmsetup.message(p.name, "create_thin 802");
    const pt = dmpool.parsePoolTable(await dmsetup.table(p.name));
    const params = {
      metaDev: p.metaDev,
      dataDev: p.dataDev,
      dataSectors: pt.dataSectors,
      blockSectors: pt.blockSectors,
      lowWaterMark: pt.lowWaterMark,
      features: pt.features,
    };
    await dmsetup.reload(p.name, dmpool.poolTable({ ...params, features: [...pt.features, "read_only"] }));
    await dmsetup.resume(p.name);
    try {
      expect((await dmpool.poolStatusOk(p.name)).mode).toBe("ro");
      const g = await gc("--force");
      expect(g.code).toBe(1);
      expect(g.r.refused?.reason).toBe("unhealthy");
      const orphan = { thinId: 802, device: null, unmount: [], deleteThin: true, reason: "not_in_db" as const, detail: "", ageMs: null, mappedBytes: null };
      const r = await act([orphan], { pool: p.name });
      expect(r.stopped?.reason).toBe("pool_not_rw");
      expect(r.results[0]!.outcome).toBe("not_run");
      // a dry-run still reports, from dmsetup alone: the health checks run first and block the
      // metadata scan (a ro pool refuses reserve_metadata_snap anyway)
      const dry = await gc();
      expect(dry.code).toBe(1);
      expect(dry.r.health?.ok).toBe(false);
      expect(dry.r.scan.metadata_skipped).toStartWith("unhealthy: ");
      expect(dry.r.scan.metadata_skipped).toContain("read-only (ro)");
    } finally {
      await dmsetup.reload(p.name, dmpool.poolTable(params));
      await dmsetup.resume(p.name);
    }
    expect((await dmpool.poolStatusOk(p.name)).mode).toBe("rw");
    expect(await thinIds()).toContain(802);
    // what the kernel logged about the mode changes blocks GC until the operator acknowledges it
    await ackKernelErrors();
    const last = await gc("--force", "--grace", "0");
    expect(last.r.orphans.map((o) => [o.thin_id, o.outcome])).toEqual([[802, "done"]]);
  });

  test("an id unknown to the DB is deleted only by a later run, once the grace period since it was first seen has passed", async () => {
    await dmsetup.message(p.name, "create_thin 850");
    const dry = await gc("--grace", "2s");
    expect(dry.r.skipped.filter((s) => s.thin_id === 850).map((s) => s.reason)).toEqual(["too_young"]);
    const first = await gc("--force", "--grace", "2s");
    expect(first.r.orphans).toEqual([]);
    expect(first.r.skipped.find((s) => s.thin_id === 850)?.detail).toContain("first seen in the pool now");
    expect(await thinIds()).toContain(850);
    const seen = db.query("SELECT first_seen_at FROM gc_unknown_ids WHERE pool = ? AND thin_id = 850").get(p.name) as { first_seen_at: number } | null;
    expect(seen).not.toBeNull();
    // a second run within the grace period still waits, and does not move the first-seen time
    const second = await gc("--force", "--grace", "1h");
    expect(second.r.skipped.find((s) => s.thin_id === 850)?.reason).toBe("too_young");
    expect(db.query("SELECT first_seen_at FROM gc_unknown_ids WHERE pool = ? AND thin_id = 850").get(p.name)).toEqual(seen);
    await Bun.sleep(2500);
    const third = await gc("--force", "--grace", "2s");
    expect(third.r.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[850, "not_in_db", "done"]]);
    expect(await thinIds()).not.toContain(850);
    expect(getThinId(db, p.name, 850)?.state).toBe("deleted");
    expect(db.query("SELECT 1 FROM gc_unknown_ids WHERE pool = ? AND thin_id = 850").get(p.name)).toBeNull();
  });

  test("a live metadata-snapshot reader is never released by --force; its own release still works", async () => {
    await dmsetup.message(p.name, "create_thin 851");
    // the reader holds its snapshot until GC is done (a marker file), however slow the host is
    const gcDone = join(stateDir, "gc-done");
    const holder = Bun.spawn(
      [
        "bun",
        "-e",
        `import { existsSync } from "node:fs"; import { withMetadataSnapshot } from "./lib/dm/metadata-snap.ts"; import { poolStatusOk } from "./lib/dm/pool.ts";
         await withMetadataSnapshot(${JSON.stringify(p.name)}, { stateDir: ${JSON.stringify(stateDir)} }, async () => {
           console.log("held " + (await poolStatusOk(${JSON.stringify(p.name)})).heldRoot);
           for (let i = 0; i < 1200 && !existsSync(${JSON.stringify(gcDone)}); i++) await Bun.sleep(100);
           console.log("still " + (await poolStatusOk(${JSON.stringify(p.name)})).heldRoot);
         });
         console.log("after " + (await poolStatusOk(${JSON.stringify(p.name)})).heldRoot);`,
      ],
      { stdout: "pipe", stderr: "inherit" },
    );
    const out = new Response(holder.stdout).text();
    for (let i = 0; i < 200 && (await dmpool.poolStatusOk(p.name)).heldRoot === null; i++) await Bun.sleep(100);
    const root = (await dmpool.poolStatusOk(p.name)).heldRoot;
    expect(root).not.toBeNull();
    // GC --force waits for the reader's lock (10 s), then leaves the snapshot alone
    const forced = await gc("--force", "--grace", "0");
    writeFileSync(gcDone, "");
    expect(forced.r.scan.metadata_skipped).toContain("metadata_snap_busy");
    expect(forced.r.scan.stale_metadata_hold).toBeNull();
    expect(forced.r.orphans.map((o) => o.thin_id)).not.toContain(851);
    expect((await dmpool.poolStatusOk(p.name)).heldRoot).toBe(root);
    expect(await holder.exited).toBe(0);
    expect((await out).trim().split("\n")).toEqual([`held ${root}`, `still ${root}`, "after null"]);
    // with no reader left, the next run scans and collects
    const next = await gc("--force", "--grace", "0");
    expect(next.r.orphans.map((o) => [o.thin_id, o.outcome])).toEqual([[851, "done"]]);
  });

  test("repair: a live row whose thin id vanished from the pool is marked gone", async () => {
    // an 'active' snapshot whose device and thin id were removed behind thinimg's back
    const s = await snapshot({ activate: true });
    updateSnapshot(db, s.snapId, { state: "active", activated_at: Date.now() });
    setThinIdState(db, p.name, s.thinId, "committed");
    await dmsetup.remove(s.name);
    await dmsetup.message(p.name, `delete ${s.thinId}`);
    for (const t of ["thin_ids", "snapshots", "devices"]) db.query(`UPDATE ${t} SET updated_at = ? WHERE thin_id = ?`).run(Date.now() - HOUR, s.thinId);
    const dry = await gc();
    // its data is gone with the thin id: lost, not detached
    expect(dry.r.repairs.map((x) => [x.kind, x.applied])).toEqual([["thin_gone", false]]);
    expect(dry.r.detached).toEqual([]);
    const forced = await gc("--force");
    expect(forced.r.repairs.every((x) => x.applied)).toBe(true);
    expect(db.query("SELECT state FROM snapshots WHERE id = ?").get(s.snapId)).toEqual({ state: "failed" });
    expect(getThinId(db, p.name, s.thinId)?.state).toBe("deleted");
    expect((await gc("--force")).r.repairs).toEqual([]);
  });
});
