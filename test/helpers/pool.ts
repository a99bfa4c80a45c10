// A real loop-backed thin pool for VM tests, in a fresh /tmp dir with a unique name.
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { pool as dmpool, dmsetup, losetup, mount, thintools } from "../../lib/dm/index.ts";
import { createLoopPool, type LoopPool } from "../../lib/dm/loop-pool.ts";
import { run, runOk } from "../../lib/exec.ts";
import { parseSize } from "../../lib/util/units.ts";

export interface TestPool extends LoopPool {
  /** Every thin id in the pool's metadata (via a metadata snapshot, always released), sorted. */
  thinIds(): Promise<number[]>;
  /** Remove every dm device on the pool, the pool, the loops and the dir (test teardown only). */
  destroy(): Promise<void>;
}

let counter = 0;

export async function makeTestPool(
  o: { dataSize?: string; metaSize?: string; name?: string; blockSize?: string; features?: string[] } = {},
): Promise<TestPool> {
  const dir = mkdtempSync("/tmp/thinimg-test-pool-");
  const name = o.name ?? `tp${process.pid}x${++counter}`;
  const p = await createLoopPool({
    dir,
    name,
    dataSize: parseSize(o.dataSize ?? "512M", "dataSize"),
    metaSize: parseSize(o.metaSize ?? "16M", "metaSize"),
    blockSize: o.blockSize ? parseSize(o.blockSize, "blockSize") : undefined,
    features: o.features,
  });
  return {
    ...p,
    async thinIds() {
      await dmpool.reserveMetadataSnap(name);
      try {
        return (await thintools.thinLs(p.metaDev, { metadataSnap: true })).map((e) => e.id).sort((a, b) => a - b);
      } finally {
        await dmpool.releaseMetadataSnap(name);
      }
    },
    async destroy() {
      // Teardown of a test's own pool: remove thin devices on it first, then the pool.
      const all = await dmsetup.infoAll();
      const poolInfo = all.find((d) => d.name === name);
      for (const d of all) {
        if (d.name === name) continue;
        const t = await dmsetup.table(d.name).catch(() => "");
        if (poolInfo && t.includes(` thin ${poolInfo.major}:${poolInfo.minor} `)) {
          await dmsetup.remove(d.name).catch(() => {});
        }
      }
      await dmsetup.remove(name).catch(() => {});
      await losetup.detach(p.metaDev).catch(() => {});
      await losetup.detach(p.dataDev).catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface FlakyPool {
  name: string;
  /** The pool's data device: a dm device of its own (no thinimg prefix, not a thin device). */
  flaky: string;
  metaDev: string;
  /** flakey with up 0 s / down 1 s: every I/O to the data device fails from now on. */
  fail(): Promise<void>;
  /** Back to a plain linear table. */
  heal(): Promise<void>;
  /** Remove thinimg's devices on it, the pool, the data device and the loops (test teardown only). */
  destroy(): Promise<void>;
}

/** A 512 MiB pool under `dir` whose data device can be switched to failing every I/O (dm-flakey). */
export async function makeFlakyPool(dir: string, name: string): Promise<FlakyPool> {
  mkdirSync(dir, { recursive: true });
  await runOk(["truncate", "-s", "16M", join(dir, "meta")]);
  await runOk(["truncate", "-s", "512M", join(dir, "data")]);
  const metaDev = await losetup.attach(join(dir, "meta"));
  const dataDev = await losetup.attach(join(dir, "data"));
  const flaky = `${name}-data`;
  const sectors = (512 * 1024 * 1024) / 512;
  const linear = `0 ${sectors} linear ${dataDev} 0`;
  await dmsetup.create(flaky, linear);
  await dmsetup.create(
    name,
    dmpool.poolTable({ metaDev, dataDev: `/dev/mapper/${flaky}`, dataSectors: sectors, blockSectors: 128, lowWaterMark: 64, features: ["error_if_no_space"] }),
  );
  const swap = async (table: string) => {
    await dmsetup.reload(flaky, table);
    await dmsetup.resume(flaky);
  };
  return {
    name,
    flaky,
    metaDev,
    fail: () => swap(`0 ${sectors} flakey ${dataDev} 0 0 1`),
    heal: () => swap(linear),
    async destroy() {
      for (const d of await dmsetup.ls()) if (d.name.startsWith(`thinimg-${name}-`)) await dmsetup.remove(d.name).catch(() => {});
      await dmsetup.remove(name).catch(() => {});
      await dmsetup.remove(flaky).catch(() => {});
      await losetup.detach(metaDev).catch(() => {});
      await losetup.detach(dataDev).catch(() => {});
    },
  };
}

/** Test teardown: unmount whatever is still mounted under `dir` (a failed test's leftovers; each
 * umount's failure is only recorded). `flags`: e.g. ["-d"] to detach loop devices too. */
export async function unmountUnder(dir: string, flags: string[] = []): Promise<void> {
  for (const m of mount.mountinfo().filter((e) => e.mountPoint.startsWith(dir))) await run(["umount", ...flags, m.mountPoint]);
}
