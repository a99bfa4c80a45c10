// Pool-level faults an operator meets, driven through the real commands on pools made by
// `bun ops/recover-pool.ts --create`: a suspended pool (or thinimg device) blocks the health checks
// with the state and the runbook step, and nothing is sent to the pool before that; recover-pool
// resumes it. A pool that runs out of data space, or of metadata space, mid-unpack is grown with one
// command (--grow-data / --grow-meta; --dry-run prints the commands first), is rw again, and the
// re-run completes; a grow interrupted mid-way is finished by the next run.
// vm-seconds: 225 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { pool as dmpool, dmsetup, losetup, thintools } from "../../lib/dm/index.ts";
import { devPathFor } from "../../lib/dm/metadata-snap.ts";
import { run } from "../../lib/exec.ts";
import { checkConsistency } from "../../lib/pipeline/consistency.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { readRecord, writeRecord } from "../../lib/recover/record.ts";
import type { RecoverReport } from "../../lib/recover/recover.ts";
import { openDb } from "../../lib/store/db.ts";
import { noise } from "../helpers/bytes.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar, sampleLayer, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { unmountUnder } from "../helpers/pool.ts";
import { type Ran, run as runCli } from "../helpers/run.ts";

requireDm();
setDefaultTimeout(600_000); // each test drives a dozen CLI runs (a bun start each in UML)

const ROOT = join(import.meta.dir, "../..");
const W = mkdtempSync("/tmp/thinimg-poolf-");
const cleanups: (() => Promise<void>)[] = [];

afterAll(async () => {
  // test teardown only: mounts left under our dirs, then the pools
  await unmountUnder(W);
  for (const c of cleanups.reverse()) await c().catch(() => {});
  rmSync(W, { recursive: true, force: true });
}, 120_000);

const spawn = (argv: string[], env: Record<string, string> = {}): Promise<Ran> =>
  runCli(argv, { env: { ...process.env, THINIMG_VIRTUAL_SIZE: "64M", ...env } });

/** A pool made by recover-pool in its own dir, and a state dir, driven through the scripts. */
class Site {
  readonly dir: string;
  readonly stateDir: string;
  constructor(
    readonly tag: string,
    readonly pool: string,
  ) {
    this.dir = join(W, `pool-${tag}`);
    this.stateDir = join(W, `state-${tag}`);
  }

  static async create(tag: string, o: { data: string; meta: string }): Promise<Site> {
    const s = new Site(tag, `pf${process.pid}${tag}`);
    const c = await s.recover("--create", "--data-size", o.data, "--meta-size", o.meta, "--pool", s.pool);
    expect(c.code, c.err).toBe(0);
    cleanups.push(() => s.destroy());
    await primeKernelLogCursor(s.stateDir);
    return s;
  }

  recover(...args: string[]): Promise<Ran> {
    return spawn(["bun", "ops/recover-pool.ts", "--dir", this.dir, ...args]);
  }

  script(name: string, args: string[], env: Record<string, string> = {}): Promise<Ran> {
    return spawn(["bun", `scripts/${name}.ts`, ...args, "--pool", this.pool, "--state-dir", this.stateDir], env);
  }

  async metaDev(): Promise<string> {
    const mm = dmpool.parsePoolTable(await dmsetup.table(this.pool)).metaDev;
    const dev = devPathFor(mm);
    if (!dev) throw new Error(`no device node for ${mm}`);
    return dev;
  }

  /** Every thin id in the pool's metadata (metadata snapshot reserved and released). */
  async thinIds(): Promise<number[]> {
    const meta = await this.metaDev();
    await dmpool.reserveMetadataSnap(this.pool);
    try {
      return (await thintools.thinLs(meta, { metadataSnap: true })).map((e) => e.id).sort((a, b) => a - b);
    } finally {
      await dmpool.releaseMetadataSnap(this.pool);
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

  async destroy(): Promise<void> {
    for (const d of await dmsetup.ls()) if (d.name.startsWith(`thinimg-${this.pool}-`)) await dmsetup.remove(d.name).catch(() => {});
    await dmsetup.resume(this.pool).catch(() => {});
    await dmsetup.remove(this.pool).catch(() => {});
    for (const l of await losetup.listDetailed()) if (l.backingFile.startsWith(`${this.dir}/`)) await losetup.detach(l.device).catch(() => {});
  }
}

describe("a suspended pool or device", () => {
  test("health blocks naming the state and the runbook step; activate sends nothing to the pool; recover-pool resumes it", async () => {
    const s = await Site.create("sus", { data: "128M", meta: "4M" });
    const src = join(W, "img-sus");
    writeLayerFamily(src, [sampleLayer(1)]);
    const u = await s.script("unpack", [src, "--name", "img"]);
    expect(u.code, u.err).toBe(0);
    expect((await s.script("health", [])).code).toBe(0);
    const ids0 = await s.thinIds();
    const tx0 = (await dmpool.poolStatusOk(s.pool)).transactionId;
    const ledger0 = s.rows("SELECT thin_id, state FROM thin_ids WHERE pool = ? ORDER BY thin_id", s.pool);

    await dmsetup.suspend(s.pool);
    try {
      expect((await dmsetup.info(s.pool))?.state).toBe("SUSPENDED");
      const h = await s.script("health", ["--json"]);
      expect(h.code).toBe(1);
      const r = JSON.parse(h.out) as { checks: { name: string; status: string; message: string; runbook: string }[] };
      const c = r.checks.find((x) => x.name === "pool.suspended")!;
      expect(c.status).toBe("block");
      expect(c.message).toContain(`pool ${s.pool} is SUSPENDED`);
      expect(h.err).toContain("blocked: pool.suspended:");
      expect(h.err).toContain("bun ops/recover-pool.ts --dir <pool dir>");
      // the other pool checks read a suspended pool's status fine: without this check it was "healthy"
      expect(r.checks.filter((x) => x.name.startsWith("pool.") && x.name !== "pool.suspended" && x.status === "block")).toEqual([]);

      const a = await s.script("activate", ["img"]);
      expect(a.code).not.toBe(0);
      expect(a.err).toContain("health check pool.suspended blocks dm work");
      expect(a.err).toContain("recover-pool.ts");
      // nothing reached the pool: no create_snap, no new thin id, nothing recorded as leaked
      expect((await dmsetup.info(s.pool))?.state).toBe("SUSPENDED");
    } finally {
      const rec = await s.recover("--json");
      expect(rec.code, rec.err).toBe(0);
      expect(JSON.parse(rec.out)).toMatchObject({ ok: true, action: "recovered" });
    }
    expect((await dmsetup.info(s.pool))?.state).toBe("ACTIVE");
    expect((await dmpool.poolStatusOk(s.pool)).transactionId).toBe(tx0);
    expect(await s.thinIds()).toEqual(ids0);
    expect(s.rows("SELECT thin_id, state FROM thin_ids WHERE pool = ? ORDER BY thin_id", s.pool)).toEqual(ledger0);
    expect((await s.script("health", [])).code).toBe(0);

    // a suspended thinimg device (an activated snapshot) blocks too, naming it
    const a = await s.script("activate", ["img", "--json"]);
    expect(a.code, a.err).toBe(0);
    const snap = JSON.parse(a.out) as { device_name: string; snapshot_id: number };
    await dmsetup.suspend(snap.device_name);
    try {
      const h = await s.script("health", []);
      expect(h.code).toBe(1);
      expect(h.err).toContain(`blocked: pool.suspended: thinimg device(s) SUSPENDED (dmsetup info: State SUSPENDED): ${snap.device_name}`);
      expect(h.err).toContain("dmsetup resume <device>");
    } finally {
      await dmsetup.resume(snap.device_name);
    }
    expect((await s.script("health", [])).code).toBe(0);
    expect((await s.script("release", [String(snap.snapshot_id)])).code).toBe(0);
  });
});

/** What the operator checks after a grow: the record, the files, the live table and the status agree. */
async function expectGrown(s: Site, dataSize: number, metaSize: number) {
  const rec = readRecord(s.dir)!;
  expect(rec).toMatchObject({ data_size: dataSize, meta_size: metaSize, grow: null });
  expect(statSync(join(s.dir, rec.data_file)).size).toBe(dataSize);
  expect(statSync(join(s.dir, rec.meta_file)).size).toBe(metaSize);
  const t = dmpool.parsePoolTable(await dmsetup.table(s.pool));
  expect([t.dataSectors, t.lowWaterMark]).toEqual([rec.data_sectors, rec.low_water_mark]);
  const st = await dmpool.poolStatusOk(s.pool);
  expect([st.mode, st.needsCheck]).toEqual(["rw", false]);
  expect(st.dataTotal).toBe(rec.data_sectors / rec.block_sectors);
  expect(st.metaTotal).toBe(metaSize / 4096);
  expect((await dmsetup.info(s.pool))?.state).toBe("ACTIVE");
}

/** Start an unpack that stops at `step` and carries on when the returned cont() is called. */
async function pausedUnpack(s: Site, args: string[], step: string, env: Record<string, string>) {
  const flag = join(W, `paused-${Date.now()}`);
  const contFile = join(W, `continue-${Date.now()}`);
  const proc = Bun.spawn(["bun", "scripts/unpack.ts", ...args, "--pool", s.pool, "--state-dir", s.stateDir], {
    cwd: ROOT,
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, ...env, THINIMG_TEST_PAUSE_AT: step, THINIMG_TEST_PAUSE_FILE: flag, THINIMG_TEST_PAUSE_CONTINUE: contFile },
  });
  for (let i = 0; i < 1200 && !existsSync(flag); i++) {
    if (proc.exitCode !== null) throw new Error(`unpack exited ${proc.exitCode} before pausing at ${step}: ${await new Response(proc.stderr).text()}`);
    await Bun.sleep(100);
  }
  expect(readFileSync(flag, "utf8")).toStartWith(`${step.split("#")[0]} `);
  return {
    cont: () => writeFileSync(contFile, "go\n"),
    done: async (): Promise<Ran> => {
      const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
      return { code, out, err };
    },
  };
}

const MiB = 1024 ** 2;

describe("growing a full pool", () => {
  test("data space exhausted mid-unpack → --grow-data (dry-run first) → the pool is rw and the re-run completes", async () => {
    const s = await Site.create("data", { data: "48M", meta: "4M" });
    const env = { THINIMG_VIRTUAL_SIZE: "256M" };
    const src = join(W, "img-big");
    writeLayerFamily(src, [
      sampleLayer(1),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/big.bin", content: noise(64 * MiB, 7) },
      ]),
    ]);
    const u = await s.script("unpack", [src, "--name", "big"], env);
    expect(u.code).not.toBe(0);
    expect(u.err).toContain("ran out of data space");
    expect((await dmpool.poolStatusOk(s.pool)).mode).toBe("out_of_data_space");
    const h = await s.script("health", []);
    expect(h.code).toBe(1);
    expect(h.err).toContain("--grow-data +SIZE");

    // --dry-run: the exact commands, nothing changed
    const rec0 = readFileSync(join(s.dir, "pool.json"), "utf8");
    const table0 = await dmsetup.table(s.pool);
    const dry = await s.recover("--grow-data", "+208M", "--dry-run");
    expect(dry.code, dry.err).toBe(0);
    const dataFile = join(s.dir, "data.img");
    const want = 256 * MiB;
    expect(dry.out).toContain(`fallocate -l ${want} ${dataFile}`);
    expect(dry.out).toMatch(/losetup --set-capacity \/dev\/loop\d+/);
    const dm = "(DM_DISABLE_UDEV=1 )?dmsetup (--noudevsync )?";
    expect(dry.out).toMatch(new RegExp(`${dm}suspend ${s.pool}; ${dm}reload ${s.pool} --table '0 ${want / 512} thin-pool `));
    expect(dry.out).toContain(`resume ${s.pool}   # resume even if the reload failed`);
    expect(readFileSync(join(s.dir, "pool.json"), "utf8")).toBe(rec0);
    expect(await dmsetup.table(s.pool)).toBe(table0);
    expect(statSync(dataFile).size).toBe(48 * MiB);

    const g = await s.recover("--grow-data", "+208M", "--json");
    expect(g.code, g.err).toBe(0);
    const report = JSON.parse(g.out) as RecoverReport;
    expect(report).toMatchObject({ ok: true, action: "grown" });
    expect(report.steps.filter((x) => x.status === "done").map((x) => x.name)).toEqual([
      "write-record",
      "extend-file",
      "refresh-loop",
      "reload-pool",
      "write-record",
    ]);
    await expectGrown(s, want, 4 * MiB);
    // a second run has nothing to do
    const again = await s.recover("--json");
    expect(JSON.parse(again.out)).toMatchObject({ ok: true, action: "healthy" });

    // the kernel's out-of-data-space lines block until the operator acknowledges them; then the
    // re-run builds the failed layer again and completes
    expect((await s.script("health", [])).code).toBe(1);
    expect((await s.script("health", ["--ack"])).code).toBe(0);
    const re = await s.script("unpack", [src, "--name", "big", "--json"], env);
    expect(re.code, re.err).toBe(0);
    expect(JSON.parse(re.out).image.state).toBe("ready");
    // GC takes the failed attempt's leftovers
    const gc = await s.script("gc", ["--force", "--grace", "0", "--json"]);
    const gr = JSON.parse(gc.out) as { orphans: { outcome: string; reason: string }[] };
    expect(gr.orphans.map((o) => [o.reason, o.outcome])).toEqual([["db_failed", "done"]]);
    // the DB agrees with the pool: every thin id in the ledger, nothing pending, nothing leaked
    const ctx = makeCtx(loadConfig({ stateDir: s.stateDir, pool: s.pool }, {}), { command: "test" });
    try {
      const c = await checkConsistency(ctx);
      expect(c.problems).toEqual([]);
      expect(c.leaked).toEqual({ thin_ids: [], devices: [], mounts: [] });
    } finally {
      ctx.db.close();
    }
  });

  test("a grow interrupted after the file was extended is finished by the next plain run", async () => {
    const s = await Site.create("crash", { data: "64M", meta: "4M" });
    // what a crash right after `fallocate` leaves: the target in the record, a longer file, the
    // loop and the pool still at the old size
    const rec = readRecord(s.dir)!;
    writeRecord(s.dir, { ...rec, grow: { data_size: 96 * MiB, meta_size: 8 * MiB, started_at: new Date().toISOString() } });
    await run(["truncate", "-s", String(96 * MiB), join(s.dir, rec.data_file)]);
    const health = await s.script("health", []);
    expect(health.code, health.err).toBe(0); // the pool itself is fine meanwhile
    const r = await s.recover("--json");
    expect(r.code, r.err).toBe(0);
    const report = JSON.parse(r.out) as RecoverReport;
    expect(report.action).toBe("grown");
    // the data file is not extended twice; the metadata file still was
    expect(report.steps.filter((x) => x.status === "done").map((x) => `${x.name} ${x.detail}`)).toEqual([
      expect.stringMatching(/^extend-file .*metadata\.img: 8\.0 MiB/),
      expect.stringMatching(/^refresh-loop /),
      expect.stringMatching(/^refresh-loop /),
      expect.stringMatching(/^reload-pool /),
      expect.stringMatching(/^write-record /),
    ]);
    await expectGrown(s, 96 * MiB, 8 * MiB);
    // asking for another size while a grow is pending is refused; so is shrinking
    const rec2 = readRecord(s.dir)!;
    writeRecord(s.dir, { ...rec2, grow: { data_size: 128 * MiB, meta_size: 8 * MiB, started_at: new Date().toISOString() } });
    const other = await s.recover("--grow-data", "200M");
    expect(other.code).toBe(8);
    expect(other.err).toContain("an interrupted grow of pool");
    writeRecord(s.dir, rec2);
    const shrink = await s.recover("--grow-data", "32M");
    expect(shrink.code).toBe(2);
    expect(shrink.err).toContain("a pool never shrinks");
  });

  test("metadata space exhausted mid-unpack (2M metadata device) → --grow-meta → the pool is rw and usable", async () => {
    const s = await Site.create("meta", { data: "256M", meta: "2M" });
    const src = join(W, "img-meta");
    writeLayerFamily(src, [
      sampleLayer(1),
      buildLayerTar([
        { path: "data/", type: "dir" },
        { path: "data/file.bin", content: noise(16 * MiB, 3) },
      ]),
    ]);
    // the unpack stops once layer 2 is mounted; meanwhile other users of the pool (here: thin ids
    // made by hand, one metadata block each) take the metadata up to the kernel's reserve
    const u = await pausedUnpack(s, [src, "--name", "meta"], "layer:mounted#2", { THINIMG_VIRTUAL_SIZE: "64M" });
    // (one shell loop: a process start per message is what costs in the VM; the kernel refuses
    // messages once the pool is out of metadata space)
    const fill = `i=1000; while [ $i -lt 1600 ] && dmsetup message "$0" 0 "create_thin $i" 2>/dev/null; do i=$((i+1)); done; echo $i`;
    const filled = await run(["sh", "-c", fill, s.pool], { timeoutMs: 240_000 });
    const st = await dmpool.poolStatusOk(s.pool);
    process.stderr.write(`[pool-faults] ${filled.stdout.trim()}: `);
    process.stderr.write(`[pool-faults] metadata ${st.metaUsed}/${st.metaTotal}, mode ${st.mode}\n`);
    expect(st.mode).toBe("ro");
    u.cont();
    const failed = await u.done();
    expect(failed.code).not.toBe(0);
    const h = await s.script("health", []);
    expect(h.code).toBe(1);
    expect(h.err).toContain("out of metadata space");
    expect(h.err).toContain("--grow-meta +SIZE");

    const g = await s.recover("--grow-meta", "+14M", "--json");
    expect(g.code, g.err).toBe(0);
    expect(JSON.parse(g.out)).toMatchObject({ ok: true, action: "grown" });
    await expectGrown(s, 256 * MiB, 16 * MiB);
    // usable: once the kernel's lines are acknowledged, the re-run completes and activates
    expect((await s.script("health", ["--ack"])).code).toBe(0);
    const re = await s.script("unpack", [src, "--name", "meta", "--json"], { THINIMG_VIRTUAL_SIZE: "64M" });
    expect(re.code, re.err).toBe(0);
    const a = await s.script("activate", ["meta", "--json"]);
    expect(a.code, a.err).toBe(0);
    expect((await s.script("release", [String(JSON.parse(a.out).snapshot_id)])).code).toBe(0);
  });
});
