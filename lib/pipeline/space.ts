// How much pool space removing images would give back: the data blocks mapped ONLY by the thin ids
// GC would then delete — not shared with any thin id that stays (kept layers, active snapshots,
// anything the DB does not know). Per-id counts (thin_ls MAPPED/EXCLUSIVE_BLOCKS) cannot answer that
// for a set of ids (a block shared by two of the removed layers is exclusive to neither), so the
// block ranges come from `thin_dump` of a metadata snapshot (reserve → dump → release, under the
// state dir's metadata-snapshot lock, as GC's dry-run reads it), bounded by its timeout.
import { withMetadataSnapshot } from "../dm/metadata-snap.ts";
import { SECTOR } from "../dm/pool.ts";
import { thinDump } from "../dm/thintools.ts";
import { type AliveFn, unreferencedLayers } from "../pool/unreferenced.ts";
import type { GcRows } from "../store/gc-queries.ts";

type Range = [start: number, end: number];

export interface BlockMap {
  blockBytes: number;
  /** thin id → data block ranges [start, end) it maps. */
  byThin: Map<number, Range[]>;
}

/** Block ranges per device from thin_dump's XML (range_mapping / single_mapping lines). */
export function parseThinDumpBlocks(xml: string): BlockMap {
  const sb = /<superblock\b[^>]*\bdata_block_size="(\d+)"/.exec(xml);
  const byThin = new Map<number, Range[]>();
  let cur: Range[] | null = null;
  for (const line of xml.split("\n")) {
    const dev = /<device\s+dev_id="(\d+)"/.exec(line);
    if (dev) {
      cur = [];
      byThin.set(Number(dev[1]), cur);
      continue;
    }
    if (!cur) continue;
    const r = /<range_mapping\b[^>]*\bdata_begin="(\d+)"[^>]*\blength="(\d+)"/.exec(line);
    if (r) {
      cur.push([Number(r[1]), Number(r[1]) + Number(r[2])]);
      continue;
    }
    const s = /<single_mapping\b[^>]*\bdata_block="(\d+)"/.exec(line);
    if (s) cur.push([Number(s[1]), Number(s[1]) + 1]);
  }
  return { blockBytes: (sb ? Number(sb[1]) : 0) * SECTOR, byThin };
}

function union(ranges: Range[]): Range[] {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const out: Range[] = [];
  for (const [s, e] of sorted) {
    const last = out.at(-1);
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

/** Blocks mapped by some id in `freed` and by no id in `kept`. */
export function exclusiveBlocks(map: BlockMap, freed: Iterable<number>, kept: Iterable<number>): number {
  const u = union([...freed].flatMap((id) => map.byThin.get(id) ?? []));
  const k = union([...kept].flatMap((id) => map.byThin.get(id) ?? []));
  let total = 0;
  let j = 0;
  for (const [s, e] of u) {
    total += e - s;
    while (j < k.length && k[j]![1] <= s) j++;
    for (let i = j; i < k.length && k[i]![0] < e; i++) total -= Math.min(e, k[i]![1]) - Math.max(s, k[i]![0]);
  }
  return total;
}

const nobodyAlive: AliveFn = () => false;

/**
 * Thin ids of the layers GC would collect once `imageIds` are removed, beyond those it would collect
 * anyway (already released). Same rules as GC (lib/pool/unreferenced.ts): shared layers, parents of
 * kept or building layers and layers with an activation in flight stay.
 */
export function layersFreedBy(pool: string, rows: GcRows, imageIds: Set<number>, now: number): Set<number> {
  const before = new Set([...unreferencedLayers(pool, rows, nobodyAlive).values()].map((u) => u.thinId));
  const imageLayers = rows.imageLayers.filter((r) => !imageIds.has(r.image_id));
  const stillUsed = new Set(imageLayers.map((r) => r.layer_id));
  const dropped = new Set(rows.imageLayers.filter((r) => imageIds.has(r.image_id)).map((r) => r.layer_id));
  const layers = rows.layers.map((l) => (dropped.has(l.id) && !stillUsed.has(l.id) ? { ...l, released_at: now } : l));
  const after = unreferencedLayers(pool, { ...rows, layers, imageLayers }, nobodyAlive);
  return new Set([...after.values()].map((u) => u.thinId).filter((id) => !before.has(id)));
}

/** Thin ids that stay after GC: every id in the pool but those `freed`, the already-released layers
 * and what the ledger already calls garbage (orphaned, deleting, deleted). */
export function keptIds(pool: string, rows: GcRows, map: BlockMap, freed: Set<number>): Set<number> {
  const garbage = new Set([
    ...[...unreferencedLayers(pool, rows, nobodyAlive).values()].map((u) => u.thinId),
    ...rows.thinIds.filter((t) => t.state === "orphaned" || t.state === "deleting" || t.state === "deleted").map((t) => t.thin_id),
  ]);
  return new Set([...map.byThin.keys()].filter((id) => !freed.has(id) && !garbage.has(id)));
}

/** The pool's block map, read from a metadata snapshot (a stale hold is left for gc --force). */
export async function readBlockMap(pool: string, stateDir: string, timeoutMs = 60_000): Promise<BlockMap> {
  // list and prune only report: a busy metadata snapshot costs them the figure, never minutes
  return withMetadataSnapshot(pool, { stateDir, releaseStale: false, maxWaitMs: 10_000 }, async (metaDev) =>
    parseThinDumpBlocks(await thinDump(metaDev, { metadataSnap: true, timeoutMs, ctx: { pool_name: pool } })),
  );
}

export interface SpaceEstimate {
  bytes: number | null;
  blocks: number | null;
  /** Why it could not be computed (pool unreachable, metadata snapshot busy…). */
  detail: string | null;
}

/** What removing these images (then `gc --force`) frees, given the block map. */
export function estimateFreed(pool: string, rows: GcRows, map: BlockMap, imageIds: Set<number>, now: number): SpaceEstimate {
  const freed = layersFreedBy(pool, rows, imageIds, now);
  const blocks = exclusiveBlocks(map, freed, keptIds(pool, rows, map, freed));
  return { bytes: blocks * map.blockBytes, blocks, detail: null };
}
