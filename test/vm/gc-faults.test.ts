// GC after the pipeline's own fault paths, end to end on the real kernel: `bun scripts/unpack.ts`
// fails (a) because the pool runs out of data space mid-apply and (b) because the data device under
// the pool starts failing I/O (dm-flakey) mid-apply. Fail dumb: the failed layer's device, mount and
// thin id stay behind. The operator makes the pool healthy again the way the runbooks say (extend the
// data device; put the healthy table back under the flakey device), then `bun scripts/gc.ts` lists
// exactly those leaks and changes nothing, `--force` removes exactly them (the live image, its
// activated snapshot and the foreign flakey device untouched; pool data use back to where it was
// before the failed unpack), and a second `--force` finds nothing.
// vm-seconds: 150 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pool as dmpool, dmsetup, mount, thintools } from "../../lib/dm/index.ts";
import { run, runOk } from "../../lib/exec.ts";
import type { GcReport } from "../../lib/gc/report.ts";
import { openDb } from "../../lib/store/db.ts";
import { noise } from "../helpers/bytes.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar, sampleLayer, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { type FlakyPool, makeFlakyPool, makeTestPool, unmountUnder } from "../helpers/pool.ts";
import { type Ran, run as runCli } from "../helpers/run.ts";

requireDm();
setDefaultTimeout(600_000); // each test drives a dozen CLI runs (a bun start each in UML) and two GC cycles

const W = mkdtempSync("/tmp/thinimg-gcf-");
const cleanups: (() => Promise<void>)[] = [];

afterAll(async () => {
  // test teardown only: mounts left under our dirs, then the pools
  await unmountUnder(W);
  for (const c of cleanups.reverse()) await c().catch(() => {});
  rmSync(W, { recursive: true, force: true });
}, 120_000);

/** One pool + its state dir, driven through the real commands. */
class Scene {
  readonly stateDir: string;
  constructor(
    readonly tag: string,
    readonly pool: string,
    readonly metaDev: string,
  ) {
    this.stateDir = join(W, `state-${tag}`);
  }

  spawn(name: string, args: string[], env: Record<string, string> = {}) {
    return Bun.spawn(["bun", `scripts/${name}.ts`, ...args, "--pool", this.pool, "--state-dir", this.stateDir], {
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, THINIMG_VIRTUAL_SIZE: "256M", ...env },
    });
  }

  script(name: string, args: string[], env: Record<string, string> = {}): Promise<Ran> {
    return runCli(["bun", `scripts/${name}.ts`, ...args, "--pool", this.pool, "--state-dir", this.stateDir], {
      env: { ...process.env, THINIMG_VIRTUAL_SIZE: "256M", ...env },
    });
  }

  async gc(...args: string[]): Promise<{ code: number; r: GcReport; err: string }> {
    const r = await this.script("gc", ["--json", ...args]);
    try {
      return { code: r.code, r: JSON.parse(r.out) as GcReport, err: r.err };
    } catch {
      throw new Error(`gc ${args.join(" ")}: exit ${r.code}\n${r.out}\n${r.err}`);
    }
  }

  rows(sql: string, ...params: (string | number)[]): Record<string, unknown>[] {
    const db = openDb(join(this.stateDir, "state.db"), { readOnly: true });
    try {
      return db.query(sql).all(...params) as Record<string, unknown>[];
    } finally {
      db.close();
    }
  }

  /** Every row of the state DB (to show that a dry-run changed nothing). */
  dbDump(): string {
    const db = openDb(join(this.stateDir, "state.db"), { readOnly: true });
    try {
      const tables = (db.query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all() as { name: string }[]).map((t) => t.name);
      return JSON.stringify(tables.map((t) => [t, db.query(`SELECT * FROM ${t}`).all()]));
    } finally {
      db.close();
    }
  }

  /** Every thin id in the pool's metadata (metadata snapshot reserved and released). */
  async thinIds(): Promise<number[]> {
    await dmpool.reserveMetadataSnap(this.pool);
    try {
      return (await thintools.thinLs(this.metaDev, { metadataSnap: true })).map((e) => e.id).sort((a, b) => a - b);
    } finally {
      await dmpool.releaseMetadataSnap(this.pool);
    }
  }

  async dataUsed(): Promise<number> {
    return (await dmpool.poolStatusOk(this.pool)).dataUsed;
  }

  get mountDir() {
    return join(this.stateDir, "mnt");
  }
}

/** What `dmsetup info` shows for every device: name, major:minor, open count, state. */
async function devices(): Promise<string[]> {
  return (await dmsetup.infoAll()).map((d) => `${d.name} ${d.major}:${d.minor} open=${d.open} ${d.state}${d.inactive ? " +inactive" : ""}`).sort();
}
const deviceNames = async () => (await dmsetup.infoAll()).map((d) => d.name).sort();
const mountsNow = () =>
  mount
    .mountinfo()
    .map((m) => `${m.mountPoint} ${m.majorMinor}`)
    .sort();

/** sha256 of the live snapshot's files, read through a read-only mount (no journal replay). */
async function hashFiles(device: string): Promise<Record<string, string>> {
  const m = mkdtempSync(join(W, "ro-"));
  let mounted = false;
  try {
    await mount.mount(dmsetup.mapperPath(device), m, { readOnly: true, options: ["noload"] });
    mounted = true;
    const out: Record<string, string> = {};
    for (const f of ["top", "layers/1", "layers/2"]) out[f] = new Bun.CryptoHasher("sha256").update(readFileSync(join(m, f))).digest("hex");
    await mount.umount(m);
    mounted = false;
    return out;
  } finally {
    if (mounted) await run(["umount", m]);
    rmSync(m, { recursive: true, force: true });
  }
}

interface Live {
  layers: { thin_id: number; device_name: string }[];
  snapshot: { thin_id: number; device_name: string; snapshot_id: number };
  files: Record<string, string>;
}

/** A live image ("live": layers 1, 2). */
async function unpackLive(s: Scene, src: string): Promise<Live["layers"]> {
  writeLayerFamily(src, [sampleLayer(1), sampleLayer(2)]);
  const u = await s.script("unpack", [src, "--name", "live"]);
  expect(u.code).toBe(0);
  const layers = s.rows("SELECT thin_id, device_name FROM layers WHERE pool = ? AND state = 'committed' ORDER BY id", s.pool) as Live["layers"];
  expect(layers).toHaveLength(2);
  return layers;
}

/** An activated snapshot of the live image, and the hashes of its files. */
async function activateLive(s: Scene, layers: Live["layers"]): Promise<Live> {
  const a = await s.script("activate", ["live", "--json"]);
  expect(a.code).toBe(0);
  const snapshot = JSON.parse(a.out) as Live["snapshot"];
  const files = await hashFiles(snapshot.device_name);
  expect(Object.keys(files)).toHaveLength(3);
  return { layers, snapshot, files };
}

interface Before {
  ids: number[];
  names: string[];
  used: number;
}

interface Leaked {
  thin_id: number;
  device_name: string;
  mount: string;
}

/** The failed layer the unpack left behind, as the DB recorded it: its device, its mount in our
 * mount dir and its thin id, all recorded as leaks; the device and the mount really still there. */
async function leakedByUnpack(s: Scene, before: Before, errorKind: string): Promise<Leaked> {
  const failed = s.rows("SELECT thin_id, device_name, error_kind FROM layers WHERE pool = ? AND state = 'failed'", s.pool);
  expect(failed).toHaveLength(1);
  expect(failed[0]!.error_kind).toBe(errorKind);
  const l = { thin_id: Number(failed[0]!.thin_id), device_name: String(failed[0]!.device_name), mount: join(s.mountDir, String(failed[0]!.device_name)) };
  const work = s.rows("SELECT leaks FROM work WHERE pool = ? AND kind = 'build_layer' AND state = 'failed'", s.pool);
  expect(work).toHaveLength(1);
  const leaks = (JSON.parse(String(work[0]!.leaks)) as { kind: string; ref: string }[]).map((x) => `${x.kind}:${x.ref}`).sort();
  expect(leaks).toEqual([`device:${l.device_name}`, `mount:${l.mount}`, `thin_id:${l.thin_id}`].sort());
  // what dmsetup shows beyond the state before the unpack is exactly that device, still mounted
  const names = await deviceNames();
  expect(names.filter((n) => !before.names.includes(n))).toEqual([l.device_name]);
  expect(before.names.filter((n) => !names.includes(n))).toEqual([]);
  expect(mount.mountinfo().some((m) => m.mountPoint === l.mount)).toBe(true);
  return l;
}

/** The pool's thin ids beyond the state before the unpack are exactly the leaked one. */
function expectOneNewThinId(ids: number[], before: Before, l: Leaked) {
  expect(ids.filter((i) => !before.ids.includes(i))).toEqual([l.thin_id]);
  expect(before.ids.filter((i) => !ids.includes(i))).toEqual([]);
}

interface Expected {
  thin_id: number;
  /** null when the device was already gone (removed by the operator to repair the pool) */
  device: string | null;
  reason: string;
  commands: string[];
  /** the steps --force runs for it, beyond its claim and re-checks */
  steps: string[];
  /** repairs GC makes to the DB on the way (kind and path/device) */
  repairs: string[];
}

/** The whole GC sequence on a pool that is healthy again, with one leaked layer: the dry-run lists
 * exactly it and changes nothing; --force removes exactly it and leaves `live` and `untouched`
 * devices alone; pool use goes back to `usedBefore`; a second --force finds nothing. */
async function gcCollectsExactly(s: Scene, want: Expected, usedBefore: number, live: Live, untouched: string[] = []) {
  const key = (o: { thin_id: number | null; device: string | null }) => `${o.thin_id}/${o.device}`;
  const repairKey = (r: { kind: string; device: string | null; path: string | null }) => `${r.kind} ${r.path ?? r.device}`;

  // ---- dry-run: exactly the leak, nothing changed ----
  const ids0 = await s.thinIds();
  const names0 = await deviceNames();
  const devs0 = await devices();
  const rows0 = s.dbDump();
  const mounts0 = mountsNow();
  const dry = await s.gc("--grace", "0");
  process.stderr.write(
    `[gc-faults] ${s.tag} dry-run: ${JSON.stringify({ orphans: dry.r.orphans, skipped: dry.r.skipped, repairs: dry.r.repairs, foreign: dry.r.foreign, scan: dry.r.scan })}\n`,
  );
  expect(dry.r.mode).toBe("dry_run");
  expect(dry.r.scan.metadata_status).toBe("ok");
  expect(dry.r.orphans.map((o) => [key(o), o.reason, o.outcome, o.commands])).toEqual([[key(want), want.reason, "would_remove", want.commands]]);
  expect(dry.r.skipped).toEqual([]);
  expect(dry.r.foreign).toEqual([]);
  expect(dry.r.repairs.map((r) => [repairKey(r), r.applied])).toEqual(want.repairs.map((r) => [r, false]));
  expect(dry.code).toBe(0);
  expect(await s.thinIds()).toEqual(ids0);
  expect(await devices()).toEqual(devs0);
  expect(s.dbDump()).toBe(rows0);
  expect(mountsNow()).toEqual(mounts0);

  // ---- --force: exactly the leak is removed ----
  const keep = [live.snapshot.device_name, ...untouched];
  const keepInfo = async () =>
    Promise.all(
      keep.map(async (n) => {
        const i = await dmsetup.info(n);
        return `${n} ${i?.major}:${i?.minor} ${i?.state} ${await dmsetup.table(n)}`;
      }),
    );
  const keep0 = await keepInfo();
  const leakKernelName = want.device ? `dm-${(await dmsetup.info(want.device))?.minor}` : null;
  const force = await s.gc("--force", "--grace", "0");
  expect(force.r.refused).toBeNull();
  // unmounting a filesystem that failed mid-write may make ext4 complain (e.g. "Couldn't clean up
  // the journal"): GC reports those lines and does not let them block the next health check. Each
  // one names the device it removed, nothing else.
  process.stderr.write(`[gc-faults] ${s.tag}: kernel messages acknowledged by gc: ${JSON.stringify(force.r.kernel_messages)}\n`);
  for (const line of force.r.kernel_messages) expect([line, [...new Set(line.match(/\bdm-\d+\b/g))]]).toEqual([line, [leakKernelName!]]);
  expect(force.r.stopped).toBeNull();
  expect(force.r.orphans.map((o) => [key(o), o.reason, o.outcome])).toEqual([[key(want), want.reason, "done"]]);
  expect(force.r.orphans[0]!.steps.filter((x) => x.op !== "claim" && x.op !== "check").map((x) => `${x.op} ${x.outcome}`)).toEqual(
    want.steps.map((x) => `${x} ok`),
  );
  expect(force.r.repairs.map((r) => [repairKey(r), r.applied])).toEqual(want.repairs.map((r) => [r, true]));
  expect(force.code).toBe(0);
  expect(await s.thinIds()).toEqual(ids0.filter((i) => i !== want.thin_id));
  expect(await deviceNames()).toEqual(names0.filter((n) => n !== want.device));
  expect(s.rows("SELECT state FROM thin_ids WHERE pool = ? AND thin_id = ?", s.pool, want.thin_id)).toEqual([{ state: "deleted" }]);
  const leakedMount = join(s.mountDir, `thinimg-${s.pool}-layer-${want.thin_id}`);
  expect(mount.mountinfo().some((m) => m.mountPoint === leakedMount)).toBe(false);
  expect(s.rows("SELECT state FROM mounts WHERE path = ?", leakedMount)).toEqual([{ state: "unmounted" }]);
  if (want.device) expect(s.rows("SELECT state FROM devices WHERE pool = ? AND name = ?", s.pool, want.device)).toEqual([{ state: "removed" }]);
  // the live snapshot and foreign devices untouched (same device, same table), the snapshot's files the same
  expect(await keepInfo()).toEqual(keep0);
  expect(await hashFiles(live.snapshot.device_name)).toEqual(live.files);
  expect(s.rows("SELECT state FROM layers WHERE pool = ? AND thin_id IN (?, ?)", s.pool, live.layers[0]!.thin_id, live.layers[1]!.thin_id)).toEqual([
    { state: "committed" },
    { state: "committed" },
  ]);
  expect(s.rows("SELECT state FROM snapshots WHERE id = ?", live.snapshot.snapshot_id)).toEqual([{ state: "active" }]);
  // pool data use back to what it was before the failed unpack (discards settle asynchronously)
  let used = await s.dataUsed();
  for (let i = 0; i < 50 && used > usedBefore; i++) {
    await Bun.sleep(100);
    used = await s.dataUsed();
  }
  process.stderr.write(`[gc-faults] ${s.tag}: data blocks used before the failed unpack ${usedBefore}, after gc ${used}\n`);
  expect(Math.abs(used - usedBefore)).toBeLessThanOrEqual(2);

  // ---- a second --force finds nothing ----
  const again = await s.gc("--force", "--grace", "0");
  expect(again.r.refused).toBeNull();
  expect(again.r.orphans).toEqual([]);
  expect(again.r.skipped).toEqual([]);
  expect(again.r.repairs).toEqual([]);
  expect(again.code).toBe(0);
  expect(await s.thinIds()).toEqual(ids0.filter((i) => i !== want.thin_id));
  expect(await deviceNames()).toEqual(names0.filter((n) => n !== want.device));
}

describe("pool out of data space mid-apply", () => {
  test("unpack fails with no_space; after extending the pool, gc lists, removes exactly the leak, then finds nothing", async () => {
    const p = await makeTestPool({ dataSize: "48M" });
    cleanups.push(() => p.destroy());
    const s = new Scene("nospace", p.name, p.metaDev);
    await primeKernelLogCursor(s.stateDir);
    const live = await activateLive(s, await unpackLive(s, join(W, "live-a")));
    const before: Before = { ids: await s.thinIds(), names: await deviceNames(), used: await s.dataUsed() };
    expect(before.ids).toHaveLength(3);

    // "big" shares layer 1 with "live"; its layer 2 does not fit in the pool
    const src = join(W, "big");
    writeLayerFamily(src, [
      sampleLayer(1),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/big.bin", content: noise(64 * 1024 * 1024, 7) },
      ]),
    ]);
    const u = await s.script("unpack", [src, "--name", "big"]);
    expect(u.code).not.toBe(0);
    expect(u.err).toContain("ran out of data space");
    expect(u.err).toContain("bun scripts/gc.ts");
    const st = await dmpool.poolStatusOk(p.name);
    expect(st.mode).toBe("out_of_data_space");
    const l = await leakedByUnpack(s, before, "no_space");

    // a full pool: the dry-run runs the health checks first and, the pool being unhealthy, reports
    // from dmsetup alone (the leaked device, no metadata snapshot); --force is refused by the health
    // checks and changes nothing
    const full = await s.gc("--grace", "0");
    process.stderr.write(
      `[gc-faults] dry-run on the full pool: ${JSON.stringify({ scan: full.r.scan, orphans: full.r.orphans.map((o) => [o.thin_id, o.device, o.reason]) })}\n`,
    );
    expect(full.r.health?.ok).toBe(false);
    expect(full.r.scan.metadata_skipped).toStartWith("unhealthy: health checks failed, metadata not read: health check pool.mode blocks dm work: ");
    expect(full.r.scan.metadata_skipped).toContain("out_of_data_space");
    expect(full.r.orphans.map((o) => o.device)).toEqual([l.device_name]);
    const blocked = await s.gc("--force", "--grace", "0");
    expect(blocked.r.refused?.reason).toBe("unhealthy");
    expect(blocked.r.refused?.detail).toContain("out_of_data_space");
    expect(blocked.r.orphans).toEqual([]);
    expect(blocked.code).toBe(1);
    expect(await dmsetup.exists(l.device_name)).toBe(true);
    expect(await s.thinIds()).toContain(l.thin_id);

    // the operator extends the data device (docs/ops-recover-pool.md "Out of data space is not
    // damage"): grow the file, losetup -c, reload the pool table with the new length, resume
    const newSize = 256 * 1024 * 1024;
    await runOk(["truncate", "-s", String(newSize), p.dataFile]);
    await runOk(["losetup", "-c", p.dataDev]);
    const t = (await dmsetup.table(p.name)).split(/\s+/);
    t[1] = String(Math.floor(newSize / 512 / p.blockSectors) * p.blockSectors);
    await dmsetup.reload(p.name, t.join(" "));
    await dmsetup.resume(p.name);
    const grown = await dmpool.poolStatusOk(p.name);
    expect(grown.mode).toBe("rw");
    expect(grown.dataTotal).toBe(newSize / (p.blockSectors * 512));
    expectOneNewThinId(await s.thinIds(), before, l);
    // the kernel logged the fault: it blocks every check until the operator, having read it,
    // acknowledges it
    const h1 = await s.script("health", ["--json"]);
    expect(h1.code, h1.err).toBe(1);
    const dmesg = (JSON.parse(h1.out) as { checks: { name: string; details?: { findings?: { line: string; acknowledged: boolean }[] } }[] }).checks.find(
      (c) => c.name === "host.dmesg",
    );
    expect(dmesg?.details?.findings?.some((f) => f.line.includes("out-of-data-space") && !f.acknowledged)).toBe(true);
    expect((await s.script("health", [])).code).toBe(1);
    const h2 = await s.script("health", ["--ack", "--json"]);
    expect(h2.code, h2.err).toBe(0);

    await gcCollectsExactly(
      s,
      {
        thin_id: l.thin_id,
        device: l.device_name,
        reason: "db_failed",
        commands: [`umount ${l.mount}`, `dmsetup remove ${l.device_name}`, `dmsetup message ${s.pool} 0 "delete ${l.thin_id}"`],
        steps: ["umount", "remove", "delete"],
        repairs: [],
      },
      before.used,
      live,
    );
  });
});

/** A pool whose data device is a dm device (not ours: no thinimg prefix, not a thin device) that can
 * be switched to failing every I/O (flakey) and back (linear). */
async function flakyPool(tag: string): Promise<FlakyPool> {
  const fk = await makeFlakyPool(join(W, tag), `gf${tag}${process.pid}`);
  cleanups.push(() => fk.destroy());
  return fk;
}

describe("I/O errors under a layer (dm-flakey data device)", () => {
  test("unpack fails with an I/O error; the pool goes read-only; after healing the device and repairing the pool, gc lists, removes exactly the leak, then finds nothing", async () => {
    const fk = await flakyPool("io");
    const s = new Scene("io", fk.name, fk.metaDev);
    await primeKernelLogCursor(s.stateDir);
    const layers = await unpackLive(s, join(W, "live-b"));
    const before: Before = { ids: await s.thinIds(), names: await deviceNames(), used: await s.dataUsed() };
    expect(before.names).toContain(fk.flaky);
    const healthyTable = await dmsetup.table(fk.flaky);
    expect(healthyTable).toContain(" linear ");

    // "fl" shares layer 1 with "live"; its layer 2 build pauses once mounted, the data device
    // starts failing, the apply runs into it
    const src = join(W, "fl");
    writeLayerFamily(src, [
      sampleLayer(1),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/file.bin", content: noise(8 * 1024 * 1024, 11) },
      ]),
    ]);
    const paused = join(W, "io-paused");
    const cont = join(W, "io-continue");
    const proc = s.spawn("unpack", [src, "--name", "fl"], {
      THINIMG_TEST_PAUSE_AT: "layer:mounted",
      THINIMG_TEST_PAUSE_FILE: paused,
      THINIMG_TEST_PAUSE_CONTINUE: cont,
    });
    let u: Ran;
    try {
      for (let i = 0; i < 1200 && !existsSync(paused); i++) {
        if (proc.exitCode !== null) throw new Error(`unpack exited ${proc.exitCode} before pausing: ${await new Response(proc.stderr).text()}`);
        await Bun.sleep(100);
      }
      await fk.fail();
      writeFileSync(cont, "go\n");
      const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
      u = { code, out, err };
    } finally {
      proc.kill(9);
      // the operator's first fix: the healthy table back under the pool's data device
      await fk.heal();
    }
    expect(u.code).not.toBe(0);
    expect(u.err).toContain("bun scripts/gc.ts");
    expect(await dmsetup.table(fk.flaky)).toBe(healthyTable);
    const l = await leakedByUnpack(s, before, "io");

    // The kernel flushes the data device before every metadata commit; that flush failed, so the
    // pool aborted its transaction and went read-only with needs_check ("pre-commit callback
    // failed"). Healing the device does not bring it back: health blocks, GC refuses --force, and
    // the dry-run reports from dmsetup alone (a read-only pool refuses reserve_metadata_snap).
    const st = await dmpool.poolStatusOk(fk.name);
    expect([st.mode, st.needsCheck]).toEqual(["ro", true]);
    expect((await s.script("health", [])).code).toBe(1);
    const blocked = await s.gc("--force", "--grace", "0");
    expect(blocked.r.refused?.reason).toBe("unhealthy");
    expect(blocked.code).toBe(1);
    const dryRo = await s.gc("--grace", "0");
    expect(dryRo.r.scan.metadata_skipped).toStartWith("unhealthy: ");
    expect(dryRo.r.orphans.map((o) => o.device)).toEqual([l.device_name]);
    expect(await dmsetup.exists(l.device_name)).toBe(true);

    // The operator repairs the pool as docs/ops-recover-pool.md "A loaded pool that is not healthy"
    // says (recover-pool itself only handles loop-backed pools with a pool.json; this one sits on
    // the flakey device, so its steps are done by hand): unmount and remove every thin device on
    // the pool — here only the leaked layer; the live image's layers are not active —, remove the
    // pool, thin_check the metadata (clearing needs_check), load the same table again.
    const poolTableLine = await dmsetup.table(fk.name);
    await runOk(["umount", l.mount]);
    await dmsetup.remove(l.device_name);
    await dmsetup.remove(fk.name);
    const check = await thintools.thinCheck(fk.metaDev, { clearNeedsCheck: true });
    expect(check.ok).toBe(true);
    // the inactive metadata still holds the leaked thin id: exactly one beyond the live image's
    expectOneNewThinId(
      (await thintools.thinLs(fk.metaDev)).map((e) => e.id).sort((a, b) => a - b),
      before,
      l,
    );
    await dmsetup.create(fk.name, poolTableLine);
    const back = await dmpool.poolStatusOk(fk.name);
    expect([back.mode, back.needsCheck]).toEqual(["rw", false]);
    expectOneNewThinId(await s.thinIds(), before, l);
    // the kernel logged the I/O errors: they block until the operator, having read them with the
    // health check, acknowledges them
    expect((await s.script("health", [])).code).toBe(1);
    const h = await s.script("health", ["--ack"]);
    expect(h.code, h.err).toBe(0);

    // images are used again: a live activated snapshot next to the leak
    const live = await activateLive(s, layers);

    // the leak is now only the thin id (the operator removed the device and the mount)
    await gcCollectsExactly(
      s,
      {
        thin_id: l.thin_id,
        device: null,
        reason: "db_failed",
        commands: [`dmsetup message ${s.pool} 0 "delete ${l.thin_id}"`],
        steps: ["delete"],
        repairs: [`device_row_gone ${l.device_name}`, `mount_gone ${l.mount}`],
      },
      before.used,
      live,
      [fk.flaky],
    );
    // the device row the operator's repair left `leaked` was repaired to match the kernel
    expect(s.rows("SELECT state FROM devices WHERE pool = ? AND name = ?", s.pool, l.device_name)).toEqual([{ state: "removed" }]);
  });
});
