// Read-only queries for GC (issue 5; owned by the GC engineer). Everything GC needs about one pool,
// read in ONE transaction so the picture is consistent with itself.
import type { Db } from "./db.ts";
import type { DeviceRow } from "./devices.ts";
import type { ImageRow } from "./images.ts";
import type { LayerRow } from "./layers.ts";
import type { MountRow } from "./mounts.ts";
import type { SnapshotRow } from "./snapshots.ts";
import type { ThinIdRow } from "./thin-ids.ts";
import type { WorkRow } from "./work.ts";

export interface GcRows {
  thinIds: ThinIdRow[];
  layers: LayerRow[];
  snapshots: SnapshotRow[];
  devices: DeviceRow[];
  mounts: MountRow[];
  images: Pick<ImageRow, "id" | "name" | "state">[];
  /** image id → layer ids (any position). */
  imageLayers: { image_id: number; layer_id: number }[];
  runningWork: WorkRow[];
}

export function readGcRows(db: Db, pool: string): GcRows {
  return db.transaction(() => ({
    thinIds: db.query("SELECT * FROM thin_ids WHERE pool = ? ORDER BY thin_id").all(pool) as ThinIdRow[],
    layers: db.query("SELECT * FROM layers WHERE pool = ? ORDER BY id").all(pool) as LayerRow[],
    snapshots: db.query("SELECT * FROM snapshots WHERE pool = ? ORDER BY id").all(pool) as SnapshotRow[],
    devices: db.query("SELECT * FROM devices WHERE pool = ? ORDER BY name").all(pool) as DeviceRow[],
    mounts: db.query("SELECT * FROM mounts WHERE pool = ? ORDER BY path").all(pool) as MountRow[],
    images: db.query("SELECT id, name, state FROM images WHERE pool = ? ORDER BY id").all(pool) as Pick<ImageRow, "id" | "name" | "state">[],
    imageLayers: db
      .query("SELECT il.image_id AS image_id, il.layer_id AS layer_id FROM image_layers il JOIN images i ON i.id = il.image_id WHERE i.pool = ?")
      .all(pool) as { image_id: number; layer_id: number }[],
    runningWork: db.query("SELECT * FROM work WHERE pool = ? AND state = 'running' ORDER BY id").all(pool) as WorkRow[],
  }))();
}

/** Images whose layer list includes any of these layers. */
export function imagesUsingLayers(db: Db, layerIds: number[]): number[] {
  if (layerIds.length === 0) return [];
  const ph = layerIds.map(() => "?").join(",");
  return (db.query(`SELECT DISTINCT image_id FROM image_layers WHERE layer_id IN (${ph}) ORDER BY image_id`).all(...layerIds) as { image_id: number }[]).map(
    (r) => r.image_id,
  );
}
