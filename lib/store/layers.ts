// Layer devices, one per chain id per pool. A committed layer is immutable and shared by every image
// whose layer chain has it as a prefix.
import { type Db, now } from "./db.ts";
import { getDevice, setDeviceState } from "./devices.ts";
import { getMount, setMountState } from "./mounts.ts";
import { getThinId, setThinIdState } from "./thin-ids.ts";

export type LayerState = "building" | "committed" | "failed";

/** Build steps in order; `phase` holds the last one completed (the resume point). */
export const LAYER_PHASES = ["new", "allocated", "created", "activated", "formatted", "mounted", "applied", "unmounted", "deactivated", "committed"] as const;
export type LayerPhase = (typeof LAYER_PHASES)[number];

export interface LayerRow {
  id: number;
  pool: string;
  chain_id: string;
  parent_id: number | null;
  parent_chain_id: string | null;
  identity: string;
  diff_id: string | null;
  digest: string;
  size: number;
  thin_id: number | null;
  device_name: string | null;
  virtual_size: number;
  state: LayerState;
  phase: LayerPhase;
  attempt: number;
  error: string | null;
  error_kind: string | null;
  stats: string | null;
  created_at: number;
  updated_at: number;
  committed_at: number | null;
  /** When a removal left this layer referenced by no image (GC may then collect it). */
  released_at?: number | null;
}

export function getLayerByChain(db: Db, pool: string, chainId: string): LayerRow | null {
  return db.query("SELECT * FROM layers WHERE pool = ? AND chain_id = ?").get(pool, chainId) as LayerRow | null;
}

/** Whether any layer row of the pool (any state) has a blob of this size: if none, no row can hold
 * a blob of a given digest of that size either, so there is no need to hash it to look one up. */
export function anyLayerOfSize(db: Db, pool: string, size: number): boolean {
  return db.query("SELECT 1 FROM layers WHERE pool = ? AND size = ? LIMIT 1").get(pool, size) !== null;
}

export function getLayer(db: Db, id: number): LayerRow | null {
  return db.query("SELECT * FROM layers WHERE id = ?").get(id) as LayerRow | null;
}

export function insertLayer(
  db: Db,
  l: {
    pool: string;
    chainId: string;
    parentId: number | null;
    parentChainId: string | null;
    identity: string;
    diffId: string | null;
    digest: string;
    size: number;
    virtualSize: number;
  },
): LayerRow {
  const t = now();
  const r = db
    .query(
      `INSERT INTO layers (pool, chain_id, parent_id, parent_chain_id, identity, diff_id, digest, size, virtual_size, state, phase, attempt, created_at, updated_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'building', 'new', 0, ?, ?) RETURNING *`,
    )
    .get(l.pool, l.chainId, l.parentId, l.parentChainId, l.identity, l.diffId, l.digest, l.size, l.virtualSize, t, t) as LayerRow;
  return r;
}

type LayerPatch = Partial<
  Pick<
    LayerRow,
    | "thin_id"
    | "device_name"
    | "state"
    | "phase"
    | "attempt"
    | "error"
    | "error_kind"
    | "stats"
    | "committed_at"
    | "virtual_size"
    | "chain_id"
    | "identity"
    | "digest"
    | "diff_id"
  >
>;

export function updateLayer(db: Db, id: number, patch: LayerPatch): void {
  const keys = Object.keys(patch) as (keyof LayerPatch)[];
  if (keys.length === 0) return;
  const sets = keys.map((k) => `${k} = ?`).join(", ");
  db.query(`UPDATE layers SET ${sets}, updated_at = ? WHERE id = ?`).run(...keys.map((k) => patch[k] ?? null), now(), id);
}

export function listLayers(db: Db, pool: string): LayerRow[] {
  return db.query("SELECT * FROM layers WHERE pool = ? ORDER BY id").all(pool) as LayerRow[];
}

/** Images referencing each layer (for listings and GC's "unreferenced" view). */
export function layerRefCounts(db: Db, pool: string): Map<number, number> {
  const rows = db
    .query("SELECT l.id AS id, COUNT(il.image_id) AS n FROM layers l LEFT JOIN image_layers il ON il.layer_id = l.id WHERE l.pool = ? GROUP BY l.id")
    .all(pool) as { id: number; n: number }[];
  return new Map(rows.map((r) => [r.id, r.n]));
}

/**
 * Give up on a layer's current build attempt (call inside a transaction): its thin id, device and
 * mounts are left in place and recorded as leftovers for GC, and the layer starts afresh (a new thin
 * id) on the next build. Used by the pipeline when an attempt cannot be resumed safely, and by GC
 * when it collects an interrupted build whose builder died.
 */
export function abandonLayerAttempt(db: Db, pool: string, l: LayerRow, why: string, mountPath: string | null = null): void {
  if (l.thin_id !== null) {
    const t = getThinId(db, pool, l.thin_id);
    if (t && t.state !== "deleted" && t.state !== "deleting")
      setThinIdState(db, pool, l.thin_id, "orphaned", `abandoned build attempt of layer ${l.id}: ${why}`);
  }
  const mounts = new Set<string>(mountPath ? [mountPath] : []);
  if (l.device_name) {
    const d = getDevice(db, pool, l.device_name);
    if (d && (d.state === "active" || d.state === "activating" || d.state === "removing"))
      setDeviceState(db, pool, d.name, "leaked", `abandoned build attempt: ${why}`);
    const rows = db.query("SELECT path FROM mounts WHERE pool = ? AND device_name = ?").all(pool, l.device_name) as { path: string }[];
    for (const m of rows) mounts.add(m.path);
  }
  for (const path of mounts) {
    const m = getMount(db, path);
    if (m && m.state !== "unmounted") setMountState(db, path, "leaked", `abandoned build attempt: ${why}`);
  }
  updateLayer(db, l.id, { thin_id: null, device_name: null, phase: "new", state: "building", error: null, error_kind: null });
}
