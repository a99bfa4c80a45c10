// Read-only queries for GC. Everything GC needs about one pool,
// read in ONE transaction so the picture is consistent with itself — plus the compare-and-set
// "witnesses" GC re-checks just before it acts, and GC's own side table of thin ids it has seen in the
// pool without any DB record (first seen, for the grace period).
import type { Db } from "./db.ts";
import type { DeviceRow } from "./devices.ts";
import type { ImageRow } from "./images.ts";
import { isPoolLockKey } from "./keys.ts";
import type { LayerRow } from "./layers.ts";
import type { LockRow } from "./locks.ts";
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
  images: Pick<ImageRow, "id" | "name" | "state" | "updated_at">[];
  /** image id → layer ids (any position). */
  imageLayers: { image_id: number; layer_id: number }[];
  runningWork: WorkRow[];
  /** Latest build_layer work row per layer (subject `layer:<id>`), any state: who built it last. */
  buildWork?: WorkRow[];
  /** Named lock rows of this pool (`layer:<pool>:…`, `image:<pool>:…`). */
  locks?: LockRow[];
  /** Highest pool transaction id the DB recorded (steps.txn_after); null: none recorded. */
  lastTxn?: number | null;
  /** GC's side table: thin id → when GC first saw it in the pool with no DB record. */
  firstSeen?: { thin_id: number; first_seen_at: number }[];
}

// gc_unknown_ids (GC's first sightings) comes with migration 3; a read-only dry-run on a state dir
// last written by an older thinimg may not have it yet.
function hasTable(db: Db, name: string): boolean {
  return db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?").get(name) !== null;
}

const prefixed = (key: string, pool: string) => isPoolLockKey(pool, key);

export function readGcRows(db: Db, pool: string): GcRows {
  return db.transaction(() => ({
    thinIds: db.query("SELECT * FROM thin_ids WHERE pool = ? ORDER BY thin_id").all(pool) as ThinIdRow[],
    layers: db.query("SELECT * FROM layers WHERE pool = ? ORDER BY id").all(pool) as LayerRow[],
    snapshots: db.query("SELECT * FROM snapshots WHERE pool = ? ORDER BY id").all(pool) as SnapshotRow[],
    devices: db.query("SELECT * FROM devices WHERE pool = ? ORDER BY name").all(pool) as DeviceRow[],
    mounts: db.query("SELECT * FROM mounts WHERE pool = ? ORDER BY path").all(pool) as MountRow[],
    images: db.query("SELECT id, name, state, updated_at FROM images WHERE pool = ? ORDER BY id").all(pool) as GcRows["images"],
    imageLayers: db
      .query("SELECT il.image_id AS image_id, il.layer_id AS layer_id FROM image_layers il JOIN images i ON i.id = il.image_id WHERE i.pool = ?")
      .all(pool) as { image_id: number; layer_id: number }[],
    runningWork: db.query("SELECT * FROM work WHERE pool = ? AND state = 'running' ORDER BY id").all(pool) as WorkRow[],
    buildWork: db
      .query("SELECT * FROM work WHERE id IN (SELECT MAX(id) FROM work WHERE pool = ? AND kind = 'build_layer' GROUP BY subject) ORDER BY id")
      .all(pool) as WorkRow[],
    locks: (db.query("SELECT * FROM locks ORDER BY key").all() as LockRow[]).filter((l) => prefixed(l.key, pool)),
    lastTxn: (db.query("SELECT MAX(txn_after) AS m FROM steps WHERE pool = ?").get(pool) as { m: number | null }).m,
    firstSeen: hasTable(db, "gc_unknown_ids")
      ? (db.query("SELECT thin_id, first_seen_at FROM gc_unknown_ids WHERE pool = ? ORDER BY thin_id").all(pool) as {
          thin_id: number;
          first_seen_at: number;
        }[])
      : [],
  }))();
}

// ----- compare-and-set witnesses -----

/** The rows an action on (thin id, device) depends on. */
export type ActionRows = Pick<GcRows, "thinIds" | "layers" | "snapshots" | "devices">;

/**
 * A fingerprint of every row that decides whether (thin id, device) is garbage: its ledger row, the
 * layers and snapshots that reference the id or the device name, the device row. Computed from the
 * rows the plan was made from and again, freshly read, just before acting: any difference means
 * someone (an unpack re-run, an activation) changed them since — GC then leaves it alone.
 */
export function actionWitness(rows: ActionRows, thinId: number | null, device: string | null): string {
  const refId = (id: number | null) => thinId !== null && id === thinId;
  const refName = (n: string | null) => device !== null && n === device;
  return JSON.stringify({
    t: rows.thinIds.filter((t) => refId(t.thin_id)).map((t) => [t.thin_id, t.state, t.owner_kind, t.owner_id, t.updated_at]),
    l: rows.layers.filter((l) => refId(l.thin_id) || refName(l.device_name)).map((l) => [l.id, l.state, l.phase, l.thin_id, l.device_name, l.updated_at]),
    s: rows.snapshots.filter((s) => refId(s.thin_id) || refName(s.device_name)).map((s) => [s.id, s.state, s.thin_id, s.device_name, s.updated_at]),
    d: rows.devices.filter((d) => refName(d.name) || refId(d.thin_id)).map((d) => [d.name, d.state, d.thin_id, d.updated_at]),
  });
}

/**
 * actionWitness for many actions over the same rows: the rows are indexed by thin id and device name
 * once (a plan of thousands of actions would otherwise scan every row per action). Same strings.
 */
export function actionWitnesses(rows: ActionRows): (thinId: number | null, device: string | null) => string {
  // device names share the map with thin ids: prefixed, so a name never meets a number
  const byName = (n: string | null) => (n === null ? null : `n:${n}`);
  const index = <T>(list: T[], keys: (r: T) => (string | number | null)[]) => {
    const m = new Map<string | number, number[]>();
    list.forEach((r, i) => {
      for (const k of new Set(keys(r))) {
        if (k === null) continue;
        const at = m.get(k);
        if (at) at.push(i);
        else m.set(k, [i]);
      }
    });
    return (thinId: number | null, device: string | null): T[] => {
      const keyed = (k: string | number | null) => (k === null ? [] : (m.get(k) ?? []));
      const at = new Set([...keyed(thinId), ...keyed(byName(device))]);
      return [...at].sort((a, b) => a - b).map((i) => list[i]!);
    };
  };
  const t = index(rows.thinIds, (r) => [r.thin_id]);
  const l = index(rows.layers, (r) => [r.thin_id, byName(r.device_name)]);
  const s = index(rows.snapshots, (r) => [r.thin_id, byName(r.device_name)]);
  const d = index(rows.devices, (r) => [r.thin_id, byName(r.name)]);
  return (thinId, device) =>
    actionWitness({ thinIds: t(thinId, null), layers: l(thinId, device), snapshots: s(thinId, device), devices: d(thinId, device) }, thinId, device);
}

/** The same rows, read fresh (call inside the transaction that then acts on the verdict). */
export function readActionRows(db: Db, pool: string, thinId: number | null, device: string | null): ActionRows {
  const id = thinId ?? -1;
  const name = device ?? "\u0000";
  return {
    thinIds: db.query("SELECT * FROM thin_ids WHERE pool = ? AND thin_id = ?").all(pool, id) as ThinIdRow[],
    layers: db.query("SELECT * FROM layers WHERE pool = ? AND (thin_id = ? OR device_name = ?) ORDER BY id").all(pool, id, name) as LayerRow[],
    snapshots: db.query("SELECT * FROM snapshots WHERE pool = ? AND (thin_id = ? OR device_name = ?) ORDER BY id").all(pool, id, name) as SnapshotRow[],
    devices: db.query("SELECT * FROM devices WHERE pool = ? AND (name = ? OR thin_id = ?) ORDER BY name").all(pool, name, id) as DeviceRow[],
  };
}

export interface RefKey {
  table: "layers" | "images" | "snapshots" | "thin_ids" | "devices" | "mounts";
  key: string | number;
}

/** Fingerprint of the rows a repair rewrites (state and updated_at of each). */
export function refsWitness(rows: Pick<GcRows, "thinIds" | "layers" | "snapshots" | "devices" | "mounts" | "images">, refs: RefKey[]): string {
  const one = (r: RefKey): unknown => {
    switch (r.table) {
      case "thin_ids": {
        const t = rows.thinIds.find((x) => x.thin_id === Number(r.key));
        return t ? [t.state, t.updated_at] : null;
      }
      case "layers": {
        const l = rows.layers.find((x) => x.id === Number(r.key));
        return l ? [l.state, l.thin_id, l.updated_at] : null;
      }
      case "snapshots": {
        const s = rows.snapshots.find((x) => x.id === Number(r.key));
        return s ? [s.state, s.thin_id, s.updated_at] : null;
      }
      case "devices": {
        const d = rows.devices.find((x) => x.name === String(r.key));
        return d ? [d.state, d.thin_id, d.updated_at] : null;
      }
      case "mounts": {
        const m = rows.mounts.find((x) => x.path === String(r.key));
        return m ? [m.state, m.updated_at] : null;
      }
      case "images": {
        const i = rows.images.find((x) => x.id === Number(r.key));
        return i ? [i.state, i.updated_at] : null;
      }
    }
  };
  return JSON.stringify(refs.map((r) => [r.table, r.key, one(r)]));
}

/** The rows `refs` name, read fresh. */
export function readRefRows(db: Db, pool: string, refs: RefKey[]): Parameters<typeof refsWitness>[0] {
  const nums = (t: RefKey["table"]) => refs.filter((r) => r.table === t).map((r) => Number(r.key));
  const strs = (t: RefKey["table"]) => refs.filter((r) => r.table === t).map((r) => String(r.key));
  const inList = (n: number) => Array.from({ length: n }, () => "?").join(",") || "NULL";
  const ti = nums("thin_ids");
  const la = nums("layers");
  const sn = nums("snapshots");
  const im = nums("images");
  const de = strs("devices");
  const mo = strs("mounts");
  return {
    thinIds: db.query(`SELECT * FROM thin_ids WHERE pool = ? AND thin_id IN (${inList(ti.length)})`).all(pool, ...ti) as ThinIdRow[],
    layers: db.query(`SELECT * FROM layers WHERE id IN (${inList(la.length)})`).all(...la) as LayerRow[],
    snapshots: db.query(`SELECT * FROM snapshots WHERE id IN (${inList(sn.length)})`).all(...sn) as SnapshotRow[],
    images: db.query(`SELECT id, name, state, updated_at FROM images WHERE id IN (${inList(im.length)})`).all(...im) as GcRows["images"],
    devices: db.query(`SELECT * FROM devices WHERE pool = ? AND name IN (${inList(de.length)})`).all(pool, ...de) as DeviceRow[],
    mounts: db.query(`SELECT * FROM mounts WHERE path IN (${inList(mo.length)})`).all(...mo) as MountRow[],
  };
}

/** Named lock rows that matter for a layer: its chain's lock and every image lock of the pool. */
export function readPoolLocks(db: Db, pool: string): LockRow[] {
  return (db.query("SELECT * FROM locks ORDER BY key").all() as LockRow[]).filter((l) => prefixed(l.key, pool));
}

// ----- GC's first-seen table -----

export function recordFirstSeen(db: Db, pool: string, ids: number[], at: number): void {
  const q = db.query("INSERT INTO gc_unknown_ids (pool, thin_id, first_seen_at) VALUES (?, ?, ?) ON CONFLICT (pool, thin_id) DO NOTHING");
  for (const id of ids) q.run(pool, id, at);
}

/** Forget ids that are no longer unknown-and-in-the-pool (deleted, or the DB has them now). */
export function forgetFirstSeen(db: Db, pool: string, keep: (id: number) => boolean): void {
  const rows = db.query("SELECT thin_id FROM gc_unknown_ids WHERE pool = ?").all(pool) as { thin_id: number }[];
  const del = db.query("DELETE FROM gc_unknown_ids WHERE pool = ? AND thin_id = ?");
  for (const r of rows) if (!keep(r.thin_id)) del.run(pool, r.thin_id);
}

/** Forget these ids (the pool confirmed their delete). */
export function forgetFirstSeenIds(db: Db, pool: string, ids: number[]): void {
  const del = db.query("DELETE FROM gc_unknown_ids WHERE pool = ? AND thin_id = ?");
  for (const id of ids) del.run(pool, id);
}
