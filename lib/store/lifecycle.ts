// Image lifecycle rows: removing an image (its row stays, with removed_at: snapshots reference it) and
// what prune and list need to know about each image (last use, snapshots holding it). The removal
// is one transaction, so a crash leaves either the image as it was or removed with its layers
// released; GC (lib/pool/unreferenced.ts) does the rest.
import { type Db, now, tx } from "./db.ts";
import { getImage, type ImageRow, releaseIfUnreferenced } from "./images.ts";
import { updateLayer } from "./layers.ts";

export interface RemovedRecord {
  /** The image was already removed (a repeat is a no-op). */
  already: boolean;
  /** Layers no image references any more: GC collects them (after the grace period). */
  released: number[];
  /** Layers another image still references: they stay. */
  shared: number[];
}

/** Mark an image removed and release the layers only it referenced. Call under the image's lock. */
export function removeImageRecord(db: Db, imageId: number, why: string): RemovedRecord {
  return tx(db, (): RemovedRecord => {
    const img = getImage(db, imageId);
    if (!img) throw new Error(`image ${imageId} vanished`);
    if (img.removed_at !== null && img.removed_at !== undefined) return { already: true, released: [], shared: [] };
    const t = now();
    const layers = (db.query("SELECT layer_id FROM image_layers WHERE image_id = ?").all(imageId) as { layer_id: number }[]).map((r) => r.layer_id);
    db.query("DELETE FROM image_layers WHERE image_id = ?").run(imageId);
    db.query("UPDATE images SET state = 'failed', error = ?, error_kind = 'removed', removed_at = ?, updated_at = ? WHERE id = ?").run(why, t, t, imageId);
    return { already: false, ...releaseIfUnreferenced(db, layers, t) };
  });
}

/**
 * GC deleted (or found gone) a released layer's thin id: the layer row starts afresh, exactly as an
 * abandoned build attempt does, so a later unpack of an image with this chain builds it again.
 * Only a layer that is still committed on that thin id is touched. Call inside a transaction.
 */
export function forgetReleasedLayer(db: Db, layerId: number, thinId: number): boolean {
  const l = db.query("SELECT state, thin_id FROM layers WHERE id = ?").get(layerId) as { state: string; thin_id: number | null } | null;
  if (l?.state !== "committed" || l.thin_id !== thinId) return false;
  updateLayer(db, layerId, { thin_id: null, device_name: null, state: "building", phase: "new", error: null, error_kind: null, committed_at: null });
  db.query("UPDATE layers SET released_at = NULL WHERE id = ?").run(layerId);
  return true;
}

export interface ImageUse {
  image: ImageRow;
  layerIds: number[];
  /** Snapshots holding it now (active, or an activation in flight). */
  activeSnapshots: number;
  /** Last successful activation (ms), null if never activated. */
  lastActivatedAt: number | null;
}

/** Every image of the pool that is not removed, with what prune and list need. */
export function imageUses(db: Db, pool: string): ImageUse[] {
  return db.transaction(() => {
    const images = db.query("SELECT * FROM images WHERE pool = ? AND removed_at IS NULL ORDER BY id").all(pool) as ImageRow[];
    const layersOf = db.query("SELECT layer_id FROM image_layers WHERE image_id = ? ORDER BY position");
    const snaps = db.query(
      "SELECT SUM(CASE WHEN state IN ('active','pending') THEN 1 ELSE 0 END) AS n, MAX(activated_at) AS last FROM snapshots WHERE image_id = ?",
    );
    return images.map((image) => {
      const s = snaps.get(image.id) as { n: number | null; last: number | null };
      return {
        image,
        layerIds: (layersOf.all(image.id) as { layer_id: number }[]).map((r) => r.layer_id),
        activeSnapshots: s.n ?? 0,
        lastActivatedAt: s.last,
      };
    });
  })();
}

/** Ids of removed images of the pool (for listings of snapshots that outlive their image). */
export function removedImageIds(db: Db, pool: string): Set<number> {
  return new Set((db.query("SELECT id FROM images WHERE pool = ? AND removed_at IS NOT NULL").all(pool) as { id: number }[]).map((r) => r.id));
}
