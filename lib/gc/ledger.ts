// GC's writes to the state DB: the thin id ledger around each delete (intent 'deleting' before the
// message, 'deleted' only once the pool confirms), device and mount rows as they go, and the repairs
// of rows that describe things the pool no longer has. Writes go through lib/store's functions.
import { type Db, tx } from "../store/db.ts";
import { getDevice, setDeviceState } from "../store/devices.ts";
import { markImageFailed } from "../store/images.ts";
import { updateLayer } from "../store/layers.ts";
import { getMount, setMountState } from "../store/mounts.ts";
import { updateSnapshot } from "../store/snapshots.ts";
import { type ThinIdState, getThinId, recordOrphanThinId, setThinIdState } from "../store/thin-ids.ts";
import type { GcLedger } from "./act.ts";
import type { Repair } from "./model.ts";

export function storeLedger(db: Db, pool: string): GcLedger {
  const before = new Map<number, ThinIdState | null>();
  return {
    mountUnmounted(path) {
      if (getMount(db, path)) setMountState(db, path, "unmounted", "unmounted by gc");
    },
    deviceRemoved(name) {
      if (getDevice(db, pool, name)) setDeviceState(db, pool, name, "removed", "removed by gc");
    },
    thinDeleting(id) {
      tx(db, () => {
        const t = getThinId(db, pool, id);
        before.set(id, t?.state ?? null);
        // an id the DB never knew gets a ledger row first, so its delete is on record too
        if (!t) recordOrphanThinId(db, pool, id, "found in the pool, unknown to the DB");
        setThinIdState(db, pool, id, "deleting", "gc: delete sent");
      });
    },
    thinDeleted(id) {
      setThinIdState(db, pool, id, "deleted", "gc: the pool confirmed the delete");
    },
    thinDeleteAborted(id, why) {
      const prev = before.get(id);
      setThinIdState(db, pool, id, prev && prev !== "deleting" ? prev : "orphaned", `gc: delete not done (${why.slice(0, 200)})`);
    },
  };
}

/** Apply the plan's repairs in one transaction. */
export function applyRepairs(db: Db, pool: string, repairs: Repair[]): void {
  tx(db, () => {
    for (const r of repairs) {
      const msg = r.detail.slice(0, 500);
      for (const ref of r.refs) {
        switch (ref.table) {
          case "layers":
            if (r.kind === "thin_gone") updateLayer(db, Number(ref.key), { state: "failed", error: msg, error_kind: "gone" });
            break;
          case "images":
            if (r.kind === "thin_gone") markImageFailed(db, Number(ref.key), msg, "gone");
            break;
          case "snapshots":
            if (r.kind === "thin_gone" || r.kind === "device_gone") updateSnapshot(db, Number(ref.key), { state: "failed", error: msg });
            break;
          case "thin_ids": {
            const id = Number(ref.key);
            if (!getThinId(db, pool, id)) break;
            if (r.kind === "thin_gone" || r.kind === "thin_already_deleted") setThinIdState(db, pool, id, "deleted", `gc: not in the pool (${msg.slice(0, 200)})`);
            break;
          }
          case "devices":
            if (getDevice(db, pool, String(ref.key))) setDeviceState(db, pool, String(ref.key), "removed", `gc: ${msg.slice(0, 200)}`);
            break;
          case "mounts":
            if (getMount(db, String(ref.key))) setMountState(db, String(ref.key), "unmounted", "gc: no longer mounted");
            break;
        }
      }
      // the snapshot lost its device but its thin id is still in the pool: now an orphan (after grace)
      if (r.kind === "device_gone" && r.thinId !== null) {
        const t = getThinId(db, pool, r.thinId);
        if (t && t.state !== "deleted" && t.state !== "deleting") setThinIdState(db, pool, r.thinId, "orphaned", "gc: its device was removed outside thinimg");
      }
    }
  });
}
