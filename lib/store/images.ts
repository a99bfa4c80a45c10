// Images: a name in a pool → ordered layers (by chain) and the image config.
import { type Db, now, tx } from "./db.ts";

export type ImageState = "unpacking" | "ready" | "failed";

export interface ImageRow {
  id: number;
  pool: string;
  name: string;
  source: string;
  format: string | null;
  top_chain_id: string | null;
  top_layer_id: number | null;
  config: string | null;
  state: ImageState;
  error: string | null;
  error_kind: string | null;
  created_at: number;
  updated_at: number;
  ready_at: number | null;
  /** Set by a removal (the row stays: snapshots reference it); cleared when it is unpacked again. */
  removed_at?: number | null;
}

export function getImageByName(db: Db, pool: string, name: string): ImageRow | null {
  return db.query("SELECT * FROM images WHERE pool = ? AND name = ?").get(pool, name) as ImageRow | null;
}

export function getImage(db: Db, id: number): ImageRow | null {
  return db.query("SELECT * FROM images WHERE id = ?").get(id) as ImageRow | null;
}

/** Create the image row, or move an existing failed/unpacking one (same name) to 'unpacking' for a
 * new source. A READY image stays ready, with its source and layers, while a refresh or a new source
 * is built: it keeps serving activations until markImageReady swaps in the new layer list. */
export function beginImage(db: Db, i: { pool: string; name: string; source: string; format: string | null }): ImageRow {
  const t = now();
  return db
    .query(
      `INSERT INTO images (pool, name, source, format, state, created_at, updated_at) VALUES (?, ?, ?, ?, 'unpacking', ?, ?)
       ON CONFLICT (pool, name) DO UPDATE SET
         source = CASE WHEN images.state = 'ready' THEN images.source ELSE excluded.source END,
         format = CASE WHEN images.state = 'ready' THEN images.format ELSE excluded.format END,
         state = CASE WHEN images.state = 'ready' THEN 'ready' ELSE 'unpacking' END,
         error = NULL, error_kind = NULL, removed_at = NULL, updated_at = excluded.updated_at
       RETURNING *`,
    )
    .get(i.pool, i.name, i.source, i.format, t, t) as ImageRow;
}

/**
 * Layers that just lost a reference (their image was removed, or a refresh swapped its layer list):
 * those no image references any more get released_at, which lets GC collect them. Call inside a
 * transaction, after the image_layers change.
 */
export function releaseIfUnreferenced(db: Db, layerIds: number[], t: number): { released: number[]; shared: number[] } {
  const stillUsed = db.query("SELECT 1 FROM image_layers WHERE layer_id = ? LIMIT 1");
  const mark = db.query("UPDATE layers SET released_at = ?, updated_at = ? WHERE id = ?");
  const out = { released: [] as number[], shared: [] as number[] };
  for (const lid of [...new Set(layerIds)].sort((a, b) => a - b)) {
    if (stillUsed.get(lid)) out.shared.push(lid);
    else {
      mark.run(t, t, lid);
      out.released.push(lid);
    }
  }
  return out;
}

export function markImageReady(
  db: Db,
  id: number,
  r: { format: string; config: unknown; layerIds: number[]; topChainId: string | null; source?: string },
): void {
  tx(db, () => {
    const t = now();
    const before = imageLayerIds(db, id);
    db.query("DELETE FROM image_layers WHERE image_id = ?").run(id);
    const ins = db.query("INSERT INTO image_layers (image_id, position, layer_id) VALUES (?, ?, ?)");
    for (const [pos, lid] of r.layerIds.entries()) ins.run(id, pos, lid);
    // referenced again: no longer collectable as released by an earlier removal
    const rel = db.query("UPDATE layers SET released_at = NULL WHERE id = ? AND released_at IS NOT NULL");
    for (const lid of r.layerIds) rel.run(lid);
    // a refresh that swapped the layer list: the old layers nobody uses any more go to GC
    const dropped = before.filter((lid) => !r.layerIds.includes(lid));
    if (dropped.length) releaseIfUnreferenced(db, dropped, t);
    db.query(
      "UPDATE images SET state = 'ready', source = COALESCE(?, source), format = ?, config = ?, top_layer_id = ?, top_chain_id = ?, error = NULL, error_kind = NULL, ready_at = ?, updated_at = ? WHERE id = ?",
    ).run(
      r.source ?? null,
      r.format,
      r.config === null || r.config === undefined ? null : JSON.stringify(r.config),
      r.layerIds.at(-1) ?? null,
      r.topChainId,
      t,
      t,
      id,
    );
  });
}

/** A build (unpack, refresh) failed: the image is failed — unless it is ready, in which case its
 * current layers are intact and keep serving; the error is recorded on it for `list`. */
export function markImageBuildFailed(db: Db, id: number, error: string, kind: string): void {
  db.query("UPDATE images SET state = CASE WHEN state = 'ready' THEN 'ready' ELSE 'failed' END, error = ?, error_kind = ?, updated_at = ? WHERE id = ?").run(
    error,
    kind,
    now(),
    id,
  );
}

/** The image cannot be used any more (e.g. GC found its thin id gone). */
export function markImageFailed(db: Db, id: number, error: string, kind: string): void {
  db.query("UPDATE images SET state = 'failed', error = ?, error_kind = ?, updated_at = ? WHERE id = ?").run(error, kind, now(), id);
}

export function listImages(db: Db, pool: string): ImageRow[] {
  return db.query("SELECT * FROM images WHERE pool = ? ORDER BY id").all(pool) as ImageRow[];
}

export function imageLayerIds(db: Db, imageId: number): number[] {
  return (db.query("SELECT layer_id FROM image_layers WHERE image_id = ? ORDER BY position").all(imageId) as { layer_id: number }[]).map((r) => r.layer_id);
}
