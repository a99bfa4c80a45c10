// GC's writes to the state DB: the claim before each orphan (compare-and-set against the rows the plan
// saw, intent 'deleting'), 'deleted' only once the pool confirms, device and mount rows as they go,
// and the repairs of rows that describe things the pool no longer has (also compare-and-set). Writes
// go through lib/store's functions.
import { type Db, tx } from "../store/db.ts";
import { getDevice, setDeviceState } from "../store/devices.ts";
import { actionWitness, forgetFirstSeenIds, readActionRows, readPoolLocks, readRefRows, refsWitness } from "../store/gc-queries.ts";
import { markImageFailed } from "../store/images.ts";
import { isImageLockKey, layerLockKey } from "../store/keys.ts";
import { abandonLayerAttempt, type LayerRow, updateLayer } from "../store/layers.ts";
import { forgetReleasedLayer } from "../store/lifecycle.ts";
import { getMount, setMountState } from "../store/mounts.ts";
import { updateSnapshot } from "../store/snapshots.ts";
import { getThinId, recordOrphanThinId, setThinIdState, type ThinIdState } from "../store/thin-ids.ts";
import type { GcLedger } from "./act.ts";
import type { Orphan, Repair } from "./model.ts";
import { claimUnreferencedLayer } from "./unreferenced-claim.ts";

export type AliveFn = (pid: number, startTime: number | null, host: string | null) => boolean;

/** A live process holds the layer chain's lock or an image lock of this pool: it may resume `l`. */
function lockHeld(db: Db, pool: string, l: LayerRow, alive: AliveFn): string | null {
  for (const r of readPoolLocks(db, pool)) {
    if (r.key !== layerLockKey(pool, l.chain_id) && !isImageLockKey(pool, r.key)) continue;
    if (alive(r.pid, r.start_time, r.host)) return `${r.key} is now held by pid ${r.pid} (${r.command})`;
  }
  return null;
}

/** The claim's checks, inside its transaction: null to go ahead, else why the orphan is left alone. */
function claimChecks(db: Db, pool: string, a: Orphan, alive: AliveFn): string | null {
  const fresh = readActionRows(db, pool, a.thinId, a.device);
  if (a.witness !== undefined && actionWitness(fresh, a.thinId, a.device) !== a.witness) {
    return "its DB rows changed since the scan (an unpack or activation picked it up); left alone";
  }
  for (const l of fresh.layers) {
    if (l.state === "committed") continue;
    const held = lockHeld(db, pool, l, alive);
    if (held) return `${held}: an unpack may resume layer ${l.id}; left alone`;
  }
  if (a.reason === "interrupted_build") {
    // what the pipeline's abandon() does: the attempt's thin id, device and mount are recorded
    // as leftovers and the layer starts afresh (new thin id) on the next unpack
    for (const l of fresh.layers) {
      if (l.state === "building") abandonLayerAttempt(db, pool, l, "interrupted build (its builder died), collected by gc");
    }
  }
  if (a.reason === "unreferenced_layer" && a.deleteThin && a.thinId !== null) return claimUnreferencedLayer(db, pool, a.thinId, alive);
  return null;
}

/**
 * The DB side of act. Each claim is a durable transaction (the intent `deleting` is on disk before
 * the delete is sent; claimMany makes the claims of several bare deletes in one, claim-ahead.ts); a
 * confirmed delete (`deleted`) is written with the next claim, or by flush(). A crash in between
 * leaves the id `deleting`, which the next run confirms from the pool, as it does after a timed-out
 * delete.
 */
export function storeLedger(db: Db, pool: string, o: { alive: AliveFn }): GcLedger & { flush(): void } {
  const before = new Map<number, ThinIdState | null>();
  const confirmed: number[] = [];
  const writeConfirmed = () => {
    if (confirmed.length) forgetFirstSeenIds(db, pool, confirmed);
    for (const id of confirmed.splice(0)) setThinIdState(db, pool, id, "deleted", "gc: the pool confirmed the delete");
  };
  const claimOne = (a: Orphan): string | null => {
    const why = claimChecks(db, pool, a, o.alive);
    if (why !== null || !a.deleteThin || a.thinId === null) return why;
    const id = a.thinId;
    const t = getThinId(db, pool, id);
    before.set(id, t?.state ?? null);
    // an id the DB never knew gets a ledger row first, so its delete is on record too
    if (!t) recordOrphanThinId(db, pool, id, "found in the pool, unknown to the DB");
    setThinIdState(db, pool, id, "deleting", "gc: deleting");
    return null;
  };
  const claimMany = (as: Orphan[]): (string | null)[] =>
    tx(db, () => {
      writeConfirmed();
      return as.map(claimOne);
    });
  return {
    claim: (a) => claimMany([a])[0]!,
    claimMany,
    // every claim that lets a delete go ahead committed its `deleting` row (synchronous=FULL)
    intentsDurable: true,
    mountUnmounted(path) {
      if (getMount(db, path)) setMountState(db, path, "unmounted", "unmounted by gc");
    },
    deviceRemoved(name) {
      if (getDevice(db, pool, name)) setDeviceState(db, pool, name, "removed", "removed by gc");
    },
    thinDeleted(id) {
      confirmed.push(id);
    },
    thinDeleteAborted(id, why) {
      tx(db, () => {
        writeConfirmed();
        // only our own intent is undone
        if (getThinId(db, pool, id)?.state !== "deleting") return;
        const prev = before.get(id);
        setThinIdState(db, pool, id, prev && prev !== "deleting" ? prev : "orphaned", `gc: delete not done (${why.slice(0, 200)})`);
      });
    },
    flush() {
      if (confirmed.length) tx(db, writeConfirmed);
    },
  };
}

/**
 * Apply the plan's repairs in one transaction, each only if the rows it rewrites are still what the
 * plan saw (compare-and-set on state and updated_at, all checked before any is applied: repairs of
 * one snapshot share rows): a row an unpack or activation changed meanwhile is newer than GC's
 * verdict. Returns the repairs NOT applied.
 */
export function applyRepairs(db: Db, pool: string, repairs: Repair[]): Repair[] {
  return tx(db, () => {
    const current = repairs.map((r) => r.witness === undefined || refsWitness(readRefRows(db, pool, r.refs), r.refs) === r.witness);
    repairs.forEach((r, i) => {
      if (current[i]) applyOne(db, pool, r);
    });
    return repairs.filter((_, i) => !current[i]);
  });
}

function applyOne(db: Db, pool: string, r: Repair): void {
  {
    const msg = r.detail.slice(0, 500);
    for (const ref of r.refs) {
      switch (ref.table) {
        case "layers":
          if (r.kind === "thin_gone") updateLayer(db, Number(ref.key), { state: "failed", error: msg, error_kind: "gone" });
          // a released layer whose id is already gone: the row lets go of it
          else if (r.kind === "thin_already_deleted" && r.thinId !== null) forgetReleasedLayer(db, Number(ref.key), r.thinId);
          break;
        case "images":
          if (r.kind === "thin_gone") markImageFailed(db, Number(ref.key), msg, "gone");
          break;
        case "snapshots":
          if (r.kind === "thin_gone") updateSnapshot(db, Number(ref.key), { state: "failed", error: msg });
          break;
        case "thin_ids": {
          const id = Number(ref.key);
          if (!getThinId(db, pool, id)) break;
          if (r.kind === "thin_gone" || r.kind === "thin_already_deleted")
            setThinIdState(db, pool, id, "deleted", `gc: not in the pool (${msg.slice(0, 200)})`);
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
  }
}
