// Pool-level faults an operator meets, driven through the real commands on pools made by
// `bun ops/recover-pool.ts --create`: a suspended pool (or thinimg device) blocks the health checks
// with the state and the runbook step, and nothing is sent to the pool before that; recover-pool
// resumes it.
// vm-seconds: 60 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { dmsetup, losetup, mount, pool as dmpool, thintools } from "../../lib/dm/index.ts";
import { devPathFor } from "../../lib/dm/metadata-snap.ts";
import { run } from "../../lib/exec.ts";
import { openDb } from "../../lib/store/db.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { sampleLayer, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";

requireDm();
setDefaultTimeout(300_000);

const ROOT = join(import.meta.dir, "../..");
const W = mkdtempSync("/tmp/thinimg-poolf-");
const cleanups: (() => Promise<void>)[] = [];

afterAll(async () => {
  // test teardown only: mounts left under our dirs, then the pools
  for (const m of mount.mountinfo().filter((e) => e.mountPoint.startsWith(W))) await run(["umount", m.mountPoint]);
  for (const c of cleanups.reverse()) await c().catch(() => {});
  rmSync(W, { recursive: true, force: true });
}, 120_000);

interface Ran {
  code: number;
  out: string;
  err: string;
}

async function spawn(argv: string[], env: Record<string, string> = {}): Promise<Ran> {
  const p = Bun.spawn(argv, { cwd: ROOT, stdout: "pipe", stderr: "pipe", env: { ...process.env, THINIMG_VIRTUAL_SIZE: "64M", ...env } });
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  return { code, out, err };
}

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
