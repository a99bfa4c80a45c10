// A real loop-backed thin pool for VM tests, in a fresh /tmp dir with a unique name.
import { mkdtempSync, rmSync } from "node:fs";
import { dmsetup, losetup, pool as dmpool, thintools } from "../../lib/dm/index.ts";
import { type LoopPool, createLoopPool } from "../../lib/dm/loop-pool.ts";
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
