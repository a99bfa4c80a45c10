// Act-time half of unreferenced.ts: just before GC deletes a released layer's thin id, inside the
// claim's transaction, the verdict is made again from fresh rows (an unpack may have reused the layer
// or started since the scan); if it still holds, the layer row lets go of the id (it starts afresh,
// as an abandoned build attempt does) and the id becomes an orphan GC is deleting.

import { type AliveFn, unreferencedLayers } from "../pool/unreferenced.ts";
import type { Db } from "../store/db.ts";
import { readGcRows } from "../store/gc-queries.ts";
import { forgetReleasedLayer } from "../store/lifecycle.ts";
import { setThinIdState } from "../store/thin-ids.ts";

/** Returns null to go ahead, else why the layer is kept after all. Call inside the claim's transaction. */
export function claimUnreferencedLayer(db: Db, pool: string, thinId: number, alive: AliveFn): string | null {
  const rows = readGcRows(db, pool);
  const layer = rows.layers.find((l) => l.thin_id === thinId && l.state === "committed");
  if (!layer) return null; // no committed layer holds the id any more: an ordinary orphan
  const u = unreferencedLayers(pool, rows, alive).get(layer.id);
  if (!u) return `layer ${layer.id} is referenced again (an image or an activation uses it now); left alone`;
  if (u.locked) return `${u.locked}; left alone`;
  forgetReleasedLayer(db, layer.id, thinId);
  setThinIdState(db, pool, thinId, "orphaned", `layer ${layer.id} released by an image removal, collected by gc`);
  return null;
}
