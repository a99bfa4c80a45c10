// Committed layers nothing needs any more: released by an image removal (layers.released_at) and
// referenced by no image since. Pure over the rows, like db-view.ts, which turns each into a dead
// verdict with reason `unreferenced_layer`. A released layer is still kept when
//  - an image references it again (an unpack reused it; markImageReady also clears released_at);
//  - it is an ancestor of a layer that is kept or being built (a build snapshots its parent);
//  - an activation of it is in flight (a pending snapshot: its create_snap needs the origin);
// and it is left alone this run (`locked`) while a live process holds any image lock of the pool or
// its chain's lock: an unpack in progress may be about to reuse it. Active snapshots do not keep it:
// a dm-thin snapshot does not need its origin.
import type { GcRows } from "../store/gc-queries.ts";
import { isImageLockKey, layerLockKey } from "../store/keys.ts";
import type { LayerRow } from "../store/layers.ts";

export type AliveFn = (pid: number, startTime: number | null, host: string | null) => boolean;

export interface UnreferencedLayer {
  layerId: number;
  thinId: number;
  detail: string;
  /** When it became unreferenced (the grace period counts from here). */
  since: number;
  /** A live lock holder may reuse it: left alone this run. */
  locked: string | null;
}

type Rows = Pick<GcRows, "layers" | "imageLayers" | "snapshots" | "locks">;

/** Layer ids whose chain a kept or building layer depends on (the layer itself included). */
function neededChains(layers: LayerRow[], isCandidate: (l: LayerRow) => boolean): Set<number> {
  const byId = new Map(layers.map((l) => [l.id, l]));
  const needed = new Set<number>();
  for (const l of layers) {
    const keeps = (l.state === "committed" && !isCandidate(l)) || (l.state === "building" && l.phase !== "new");
    if (!keeps) continue;
    for (
      let p = l.parent_id === null ? undefined : byId.get(l.parent_id);
      p && !needed.has(p.id);
      p = p.parent_id === null ? undefined : byId.get(p.parent_id)
    ) {
      needed.add(p.id);
    }
  }
  return needed;
}

export function unreferencedLayers(pool: string, rows: Rows, alive: AliveFn): Map<number, UnreferencedLayer> {
  const referenced = new Set(rows.imageLayers.map((r) => r.layer_id));
  const activating = new Set(rows.snapshots.filter((s) => s.state === "pending").map((s) => s.layer_id));
  const released = (l: LayerRow) => l.state === "committed" && l.thin_id !== null && (l.released_at ?? null) !== null && !referenced.has(l.id);
  const needed = neededChains(rows.layers, released);
  const locks = (rows.locks ?? []).filter((r) => alive(r.pid, r.start_time, r.host));
  const imageLock = locks.find((r) => isImageLockKey(pool, r.key));
  const out = new Map<number, UnreferencedLayer>();
  for (const l of rows.layers) {
    if (!released(l) || needed.has(l.id) || activating.has(l.id)) continue;
    const own = locks.find((r) => r.key === layerLockKey(pool, l.chain_id));
    const holder = own ?? imageLock;
    out.set(l.id, {
      layerId: l.id,
      thinId: l.thin_id!,
      detail: `layer ${l.id}: no image references it since ${new Date(l.released_at!).toISOString()} (its image was removed)`,
      since: Math.max(l.released_at!, l.updated_at),
      locked: holder ? `${holder.key} held by pid ${holder.pid} (${holder.command}): an unpack in progress may reuse layer ${l.id}` : null,
    });
  }
  return out;
}
