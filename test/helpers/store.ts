// Rows a unit test needs in a real state DB, made through lib/store the way the pipeline makes them:
// a layer on a thin id from the ledger (committed, or mid-build), an image over layers.
import type { Db } from "../../lib/store/db.ts";
import { beginImage, markImageReady } from "../../lib/store/images.ts";
import { insertLayer, updateLayer } from "../../lib/store/layers.ts";
import { allocateThinId, setThinIdState } from "../../lib/store/thin-ids.ts";

export function makeLayer(db: Db, pool: string, chain: string, parent: { id: number } | null, committed = true) {
  const l = insertLayer(db, {
    pool,
    chainId: `sha256:${chain}`,
    parentId: parent?.id ?? null,
    parentChainId: null,
    identity: chain,
    diffId: null,
    digest: `sha256:${chain}`,
    size: 1,
    virtualSize: 1 << 20,
  });
  const id = allocateThinId(db, pool, { kind: "layer", id: l.id });
  setThinIdState(db, pool, id, committed ? "committed" : "created");
  updateLayer(
    db,
    l.id,
    committed
      ? { thin_id: id, device_name: `thinimg-${pool}-layer-${id}`, state: "committed", phase: "committed" }
      : { thin_id: id, state: "building", phase: "created" },
  );
  return { id: l.id, thinId: id, chain: `sha256:${chain}` };
}

export function makeImage(db: Db, pool: string, name: string, layers: { id: number }[]): number {
  const i = beginImage(db, { pool, name, source: `/src/${name}`, format: "layer-family" });
  markImageReady(db, i.id, { format: "layer-family", config: null, layerIds: layers.map((l) => l.id), topChainId: null });
  return i.id;
}
