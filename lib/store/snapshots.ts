// Activations: one fresh thin snapshot of an image's top layer per request.
import { type Db, now, poolRowsInStates } from "./db.ts";

export type SnapshotState = "pending" | "active" | "released" | "failed";

export interface SnapshotRow {
  id: number;
  pool: string;
  image_id: number;
  layer_id: number;
  thin_id: number | null;
  device_name: string | null;
  state: SnapshotState;
  error: string | null;
  pid: number | null;
  command: string | null;
  created_at: number;
  updated_at: number;
  activated_at: number | null;
  released_at: number | null;
  /** Bytes the device is loaded with (null: rows from before it was recorded; the layer's size). */
  virtual_size: number | null;
}

export function insertSnapshot(db: Db, s: { pool: string; imageId: number; layerId: number; virtualSize: number; pid: number; command: string }): SnapshotRow {
  const t = now();
  return db
    .query(
      "INSERT INTO snapshots (pool, image_id, layer_id, virtual_size, state, pid, command, created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?) RETURNING *",
    )
    .get(s.pool, s.imageId, s.layerId, s.virtualSize, s.pid, s.command, t, t) as SnapshotRow;
}

type SnapPatch = Partial<Pick<SnapshotRow, "thin_id" | "device_name" | "state" | "error" | "activated_at" | "released_at" | "virtual_size">>;

export function updateSnapshot(db: Db, id: number, patch: SnapPatch): void {
  const keys = Object.keys(patch) as (keyof SnapPatch)[];
  if (keys.length === 0) return;
  db.query(`UPDATE snapshots SET ${keys.map((k) => `${k} = ?`).join(", ")}, updated_at = ? WHERE id = ?`).run(...keys.map((k) => patch[k] ?? null), now(), id);
}

export function getSnapshot(db: Db, id: number): SnapshotRow | null {
  return db.query("SELECT * FROM snapshots WHERE id = ?").get(id) as SnapshotRow | null;
}

export function getSnapshotByDevice(db: Db, pool: string, deviceName: string): SnapshotRow | null {
  return db.query("SELECT * FROM snapshots WHERE pool = ? AND device_name = ? ORDER BY id DESC LIMIT 1").get(pool, deviceName) as SnapshotRow | null;
}

export function listSnapshots(db: Db, pool: string, states?: SnapshotState[]): SnapshotRow[] {
  return poolRowsInStates<SnapshotRow>(db, "snapshots", pool, "id", states);
}

/** A snapshot the DB holds as handed out (active) whose device is not loaded. (Here, not in
 * pipeline/reattach.ts, so that `list` does not load the re-attach and activate code.) */
export function isDetached(s: SnapshotRow, loaded: { has(name: string): boolean }): boolean {
  return s.state === "active" && s.device_name !== null && !loaded.has(s.device_name);
}
