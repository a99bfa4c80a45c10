// What `bun scripts/list.ts` shows: images (with the pool space only each holds and its last
// activation), layers (with how many images share each), snapshots, and the pool's use when the
// pool is reachable. A handed-out snapshot whose device is not loaded (after a reboot) shows as
// `detached`: its data is kept until it is re-attached or released.
import { activeDeviceNames } from "../dm/active.ts";
import * as pool from "../dm/pool.ts";
import { errorMessage } from "../errors.ts";
import type { Db } from "../store/db.ts";
import { readGcRows } from "../store/gc-queries.ts";
import { type ImageRow, imageLayerIds, listImages } from "../store/images.ts";
import { type LayerRow, layerRefCounts, listLayers } from "../store/layers.ts";
import { imageUses } from "../store/lifecycle.ts";
import { isDetached, listSnapshots, type SnapshotRow } from "../store/snapshots.ts";
import { listThinIds } from "../store/thin-ids.ts";

/** Unix milliseconds as an ISO string, as every JSON document shows a time. */
export const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());

/** An image row as `list --json` and the service's GET /v1/images show it. */
export function imageJson(db: Db, i: ImageRow) {
  return {
    id: i.id,
    name: i.name,
    state: i.state,
    source: i.source,
    format: i.format,
    layers: imageLayerIds(db, i.id).length,
    top_chain_id: i.top_chain_id,
    ready_at: iso(i.ready_at),
    error: i.error,
  };
}

export interface Inventory {
  pool: {
    name: string;
    status: "ok" | "fail" | "error" | "unavailable";
    detail: string | null;
    transaction_id: number | null;
    data_used_pct: number | null;
    meta_used_pct: number | null;
    data_used_blocks: number | null;
    data_total_blocks: number | null;
    mode: string | null;
  };
  images: {
    id: number;
    name: string;
    state: string;
    source: string;
    format: string | null;
    layers: number;
    top_chain_id: string | null;
    ready_at: string | null;
    error: string | null;
    exclusive_bytes: number | null;
    last_activated_at: string | null;
    active_snapshots: number;
  }[];
  /** Why exclusive_bytes is null (pool unreachable, metadata snapshot busy, --no-space). */
  space_detail: string | null;
  layers: {
    id: number;
    chain_id: string;
    state: string;
    phase: string;
    thin_id: number | null;
    device_name: string | null;
    images: number;
    entries: number | null;
    bytes: number | null;
    committed_at: string | null;
    error: string | null;
  }[];
  /** state: the DB's, except `detached` (active, device not loaded: needs a re-attach). */
  snapshots: {
    id: number;
    image: string;
    state: string;
    thin_id: number | null;
    device_name: string | null;
    device_path: string | null;
    activated_at: string | null;
    released_at: string | null;
    error: string | null;
  }[];
  thin_ids: Record<string, number>;
}

/**
 * Per image, the pool space only it holds: what removing it and `gc --force` would free (blocks its
 * released layers map that no thin id that stays maps; lib/pipeline/space.ts). Needs the pool.
 */
async function exclusiveSpace(
  db: Db,
  poolName: string,
  stateDir: string | undefined,
  ids: number[],
): Promise<{ bytes: Map<number, number>; detail: string | null }> {
  if (!stateDir) return { bytes: new Map(), detail: "not computed" };
  try {
    // loaded only when asked for (`list --no-space` never runs the metadata-snapshot code)
    const { estimateFreed, readBlockMap } = await import("./space.ts");
    const map = await readBlockMap(poolName, stateDir);
    const rows = readGcRows(db, poolName);
    const now = Date.now();
    return { bytes: new Map(ids.map((id) => [id, estimateFreed(poolName, rows, map, new Set([id]), now).bytes ?? 0])), detail: null };
  } catch (e) {
    return { bytes: new Map(), detail: `exclusive space not computed: ${errorMessage(e)}` };
  }
}

/** The pool's row of the inventory: its status when probed (one bounded `dmsetup status`). */
async function poolJson(poolName: string, probe: boolean): Promise<Inventory["pool"]> {
  let p: Inventory["pool"] = {
    name: poolName,
    status: "unavailable",
    detail: null,
    transaction_id: null,
    data_used_pct: null,
    meta_used_pct: null,
    data_used_blocks: null,
    data_total_blocks: null,
    mode: null,
  };
  if (probe) {
    try {
      const st = await pool.poolStatus(poolName, { timeoutMs: 5_000 });
      if (st.kind === "ok") {
        p = {
          ...p,
          status: "ok",
          transaction_id: st.transactionId,
          data_used_pct: st.dataUsedPct,
          meta_used_pct: st.metaUsedPct,
          data_used_blocks: st.dataUsed,
          data_total_blocks: st.dataTotal,
          mode: st.mode,
        };
      } else p = { ...p, status: st.kind };
    } catch (e) {
      p = { ...p, detail: errorMessage(e) };
    }
  }
  return p;
}

/** One layer's row of the inventory. */
function layerJson(l: LayerRow, refs: Map<number, number>): Inventory["layers"][number] {
  const s = l.stats ? (JSON.parse(l.stats) as { entries?: number; bytes?: number }) : null;
  return {
    id: l.id,
    chain_id: l.chain_id,
    state: l.state,
    phase: l.phase,
    thin_id: l.thin_id,
    device_name: l.device_name,
    images: refs.get(l.id) ?? 0,
    entries: s?.entries ?? null,
    bytes: s?.bytes ?? null,
    committed_at: iso(l.committed_at),
    error: l.error,
  };
}

export async function inventory(
  db: Db,
  poolName: string,
  o: { allSnapshots?: boolean; probePool?: boolean /** compute exclusive space (reads a metadata snapshot) */; stateDir?: string } = {},
): Promise<Inventory> {
  const images = listImages(db, poolName);
  const names = new Map(images.map((i) => [i.id, i.name]));
  const refs = layerRefCounts(db, poolName);
  const thinCounts: Record<string, number> = {};
  for (const t of listThinIds(db, poolName)) thinCounts[t.state] = (thinCounts[t.state] ?? 0) + 1;
  const p = await poolJson(poolName, o.probePool !== false);
  const loaded = o.probePool !== false ? await activeDeviceNames().catch(() => null) : null;
  const stateOf = (s: SnapshotRow) => (loaded && isDetached(s, loaded) ? "detached" : s.state);
  // removed images keep their row (their snapshots reference it) but are not listed
  const uses = new Map(imageUses(db, poolName).map((u) => [u.image.id, u]));
  const space =
    p.status === "ok" ? await exclusiveSpace(db, poolName, o.stateDir, [...uses.keys()]) : { bytes: new Map<number, number>(), detail: "pool not reachable" };
  return {
    pool: p,
    images: images
      .filter((i) => uses.has(i.id))
      .map((i) => ({
        ...imageJson(db, i),
        exclusive_bytes: space.bytes.get(i.id) ?? null,
        last_activated_at: iso(uses.get(i.id)!.lastActivatedAt),
        active_snapshots: uses.get(i.id)!.activeSnapshots,
      })),
    space_detail: space.detail,
    layers: listLayers(db, poolName).map((l) => layerJson(l, refs)),
    snapshots: listSnapshots(db, poolName, o.allSnapshots ? undefined : ["active", "pending", "failed"]).map((s) => ({
      id: s.id,
      image: names.get(s.image_id) ?? String(s.image_id),
      state: stateOf(s),
      thin_id: s.thin_id,
      device_name: s.device_name,
      device_path: stateOf(s) === "active" && s.device_name ? `/dev/mapper/${s.device_name}` : null,
      activated_at: iso(s.activated_at),
      released_at: iso(s.released_at),
      error: s.error,
    })),
    thin_ids: thinCounts,
  };
}
