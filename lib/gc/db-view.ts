// The DB's side of GC: which thin ids and devices the state DB holds live, which it knows to be
// garbage (and why), and the rows to fix when what they describe is gone. Pure over the rows (see
// lib/store/gc-queries.ts) plus a "is this process alive" function, so it is unit-testable.
//
// Liveness comes from the OWNER rows first (a committed layer, an active snapshot, a layer being
// built, an activation whose process still runs) and only then from the thin id ledger: a row that
// references an id keeps it alive even if the ledger disagrees — GC errs on the side of keeping.

import { unreferencedLayers } from "../pool/unreferenced.ts";
import type { GcRows } from "../store/gc-queries.ts";
import { isImageLockKey, layerLockKey, parseWorkSubject, workSubject } from "../store/keys.ts";
import type { LayerRow } from "../store/layers.ts";
import type { SnapshotRow } from "../store/snapshots.ts";
import type { ThinIdRow } from "../store/thin-ids.ts";
import type { WorkRow } from "../store/work.ts";
import type { DbDeadReason, DbDevice, DbMount, DbThin, DbView, RowRef } from "./model.ts";

export type AliveFn = (pid: number, startTime: number | null, host: string | null) => boolean;

export interface DbViewResult {
  view: DbView;
  /** Things worth telling an operator (interrupted builds that wait for a re-run, DB contradictions). */
  notes: string[];
}

type Verdict =
  | { live: true; mustExist: boolean; detail: string; since: number; refs: RowRef[] }
  | { live: false; reason: DbDeadReason; detail: string; since: number; locked?: string | null; refs?: RowRef[] };
type LiveVerdict = Extract<Verdict, { live: true }>;
type DeadVerdict = Extract<Verdict, { live: false }>;
type LockRow = NonNullable<GcRows["locks"]>[number];

/** The rows indexed for the verdicts below, with the liveness test. */
interface RowIndex {
  pool: string;
  rows: GcRows;
  alive: AliveFn;
  layers: Map<number, LayerRow>;
  snaps: Map<number, SnapshotRow>;
  imageName: Map<number, string>;
  /** layer id → image ids */
  imagesOf: Map<number, number[]>;
  /** snapshot id → its running activation */
  activateWork: Map<number, WorkRow>;
  lockRows: LockRow[];
  /** Live holders of an image lock of this pool. */
  liveImageLocks: LockRow[];
  /** work subject → latest build work */
  buildWork: Map<string, WorkRow>;
  unreferenced: ReturnType<typeof unreferencedLayers>;
}

function indexRows(pool: string, rows: GcRows, alive: AliveFn): RowIndex {
  const imagesOf = new Map<number, number[]>();
  for (const r of rows.imageLayers) imagesOf.set(r.layer_id, [...(imagesOf.get(r.layer_id) ?? []), r.image_id]);
  const activateWork = new Map<number, WorkRow>();
  for (const w of rows.runningWork) {
    if (w.kind !== "activate") continue;
    const s = parseWorkSubject(w.subject);
    if (s?.kind === "snapshot") activateWork.set(s.id, w);
  }
  const lockRows = rows.locks ?? [];
  return {
    pool,
    rows,
    alive,
    layers: new Map(rows.layers.map((l) => [l.id, l])),
    snaps: new Map(rows.snapshots.map((s) => [s.id, s])),
    imageName: new Map(rows.images.map((i) => [i.id, i.name])),
    imagesOf,
    activateWork,
    lockRows,
    liveImageLocks: lockRows.filter((r) => isImageLockKey(pool, r.key) && alive(r.pid, r.start_time, r.host)),
    buildWork: new Map((rows.buildWork ?? []).map((w) => [w.subject, w])),
    unreferenced: unreferencedLayers(pool, rows, alive),
  };
}

function layerDesc(ix: RowIndex, l: LayerRow): string {
  const imgs = (ix.imagesOf.get(l.id) ?? []).map((i) => ix.imageName.get(i) ?? `#${i}`);
  return `layer ${l.id}${imgs.length ? ` (image ${imgs.join(", ")})` : ""}`;
}

const snapDesc = (ix: RowIndex, s: SnapshotRow) => `snapshot ${s.id} of image ${ix.imageName.get(s.image_id) ?? `#${s.image_id}`}`;

function snapInFlight(ix: RowIndex, s: SnapshotRow): boolean {
  const w = ix.activateWork.get(s.id);
  if (w) return ix.alive(w.pid, w.start_time, w.host);
  return s.pid !== null && ix.alive(s.pid, null, null);
}

const holderDesc = (r: LockRow) => `${r.key} held by pid ${r.pid} (${r.command}) since ${new Date(r.acquired_at).toISOString()}`;

// Named locks: a live holder of a layer chain's lock is building (or about to resume) it; a live
// holder of any image lock of this pool may reach any unfinished layer chain (chains are shared
// between images, and an image's layer list is only recorded once it is ready).
/** Why an unfinished layer must be left alone this run (null: nobody may resume it now). */
function layerLocked(ix: RowIndex, l: LayerRow): string | null {
  const own = ix.lockRows.find((x) => x.key === layerLockKey(ix.pool, l.chain_id));
  if (own && ix.alive(own.pid, own.start_time, own.host)) return holderDesc(own);
  if (ix.liveImageLocks.length) return `${holderDesc(ix.liveImageLocks[0]!)}: an unpack in progress may resume this layer`;
  return null;
}

/** The process building a layer: its lock holder or its running build work; null when none is alive. */
function builder(ix: RowIndex, l: LayerRow): { alive: boolean; pid: number | null } {
  const lock = ix.lockRows.find((x) => x.key === layerLockKey(ix.pool, l.chain_id));
  if (lock && ix.alive(lock.pid, lock.start_time, lock.host)) return { alive: true, pid: lock.pid };
  const subject = workSubject("layer", l.id);
  const w = ix.buildWork.get(subject) ?? ix.rows.runningWork.find((x) => x.kind === "build_layer" && x.subject === subject);
  if (w && w.state === "running" && ix.alive(w.pid, w.start_time, w.host)) return { alive: true, pid: w.pid };
  return { alive: false, pid: lock?.pid ?? w?.pid ?? null };
}

/** What a layer row says about the thin id it references. */
function layerVerdict(ix: RowIndex, l: LayerRow): Verdict {
  const refs: RowRef[] = [
    { table: "layers", key: l.id },
    { table: "thin_ids", key: l.thin_id! },
    ...(ix.imagesOf.get(l.id) ?? []).map((i): RowRef => ({ table: "images", key: i })),
  ];
  const u = ix.unreferenced.get(l.id);
  if (u) {
    const uRefs: RowRef[] = [
      { table: "thin_ids", key: u.thinId },
      { table: "layers", key: l.id },
    ];
    return { live: false, reason: "unreferenced_layer", detail: u.detail, since: u.since, locked: u.locked, refs: uRefs };
  }
  const desc = layerDesc(ix, l);
  if (l.state === "committed") return { live: true, mustExist: true, detail: `${desc} committed`, since: l.updated_at, refs };
  if (l.state === "building") {
    const b = builder(ix, l);
    if (b.alive) return { live: true, mustExist: false, detail: `${desc} building (phase ${l.phase}, pid ${b.pid})`, since: l.updated_at, refs };
    const who = b.pid === null ? "unknown" : `pid ${b.pid}`;
    const detail = `${desc}: interrupted build (phase ${l.phase}), builder ${who} dead since ${new Date(l.updated_at).toISOString()}`;
    return { live: false, reason: "interrupted_build", detail, since: l.updated_at, locked: layerLocked(ix, l) };
  }
  const detail = `${desc} failed${l.error ? `: ${l.error.slice(0, 160)}` : ""}`;
  return { live: false, reason: "db_failed", detail, since: l.updated_at, locked: layerLocked(ix, l) };
}

/** What a snapshot row says about the thin id it references. */
function snapVerdict(ix: RowIndex, s: SnapshotRow): Verdict {
  const refs: RowRef[] = [
    { table: "snapshots", key: s.id },
    { table: "thin_ids", key: s.thin_id! },
    ...(s.device_name ? [{ table: "devices", key: s.device_name } as RowRef] : []),
  ];
  const desc = snapDesc(ix, s);
  if (s.state === "active") return { live: true, mustExist: true, detail: `${desc} active`, since: s.updated_at, refs };
  if (s.state === "pending") {
    if (snapInFlight(ix, s)) return { live: true, mustExist: false, detail: `${desc} being activated (pid ${s.pid})`, since: s.updated_at, refs };
    return { live: false, reason: "db_failed", detail: `${desc}: activation interrupted (pid ${s.pid} is gone)`, since: s.updated_at };
  }
  if (s.state === "released") return { live: false, reason: "db_released", detail: `${desc} released`, since: s.updated_at };
  return { live: false, reason: "db_failed", detail: `${desc} failed${s.error ? `: ${s.error.slice(0, 160)}` : ""}`, since: s.updated_at };
}

/** thin id → verdicts from every row that references it */
function ownerVerdicts(ix: RowIndex): Map<number, Verdict[]> {
  const out = new Map<number, Verdict[]>();
  const add = (id: number | null, v: Verdict) => {
    if (id === null) return;
    const vs = out.get(id);
    if (vs) vs.push(v);
    else out.set(id, [v]);
  };
  for (const l of ix.rows.layers) add(l.thin_id, layerVerdict(ix, l));
  for (const s of ix.rows.snapshots) add(s.thin_id, snapVerdict(ix, s));
  return out;
}

/** Why an id no live row holds is garbage: the owner row says most (released, failed); the ledger's
 * state and reason add the rest. */
function deadReason(ix: RowIndex, t: ThinIdRow | undefined, dead: DeadVerdict[]): { reason: DbDeadReason; detail: string } {
  if (t?.state === "deleting") return { reason: "db_deleting", detail: "a previous GC run sent the delete but did not confirm it" };
  if (dead.length) return { reason: dead[0]!.reason, detail: dead.map((v) => v.detail).join("; ") };
  if (t?.state === "orphaned") return { reason: "db_orphaned", detail: `ledger: orphaned${t.reason ? ` (${t.reason})` : ""}` };
  if (t && t.owner_kind !== "none" && t.owner_id !== null) {
    // the ledger names an owner, but no owner row references this id
    const owner = t.owner_kind === "layer" ? ix.layers.get(t.owner_id) : ix.snaps.get(t.owner_id);
    if (!owner) return { reason: "owner_missing", detail: `ledger says ${t.owner_kind} ${t.owner_id} owns it, but that row no longer exists` };
    return { reason: "db_orphaned", detail: `superseded: ${t.owner_kind} ${t.owner_id} now uses thin id ${owner.thin_id ?? "none"}` };
  }
  return { reason: "db_orphaned", detail: `ledger: ${t?.state ?? "?"} with no owner${t?.reason ? ` (${t.reason})` : ""}` };
}

/** One thin id's entry: live when any row holds it (whatever the ledger says), else deleted or dead. */
function thinEntry(ix: RowIndex, id: number, t: ThinIdRow | undefined, vs: Verdict[], notes: string[]): DbThin {
  const live = vs.filter((v): v is LiveVerdict => v.live);
  const ledgerSince = t?.updated_at ?? 0;
  if (live.length) {
    if (t && (t.state === "orphaned" || t.state === "deleting" || t.state === "deleted")) {
      notes.push(`thin id ${id}: ledger says ${t.state} but ${live[0]!.detail}: kept`);
    }
    return {
      thinId: id,
      status: "live",
      detail: live.map((v) => v.detail).join("; "),
      since: Math.max(ledgerSince, ...live.map((v) => v.since)),
      mustExist: live.some((v) => v.mustExist) && t?.state !== "allocated",
      refs: live.flatMap((v) => v.refs),
    };
  }
  const dead = vs as DeadVerdict[];
  const since = Math.max(ledgerSince, ...dead.map((v) => v.since));
  if (t?.state === "deleted") {
    const refs: RowRef[] = [{ table: "thin_ids", key: id }];
    return { thinId: id, status: "deleted", reason: "db_deleted", detail: "ledger says GC deleted it", since, mustExist: false, refs };
  }
  const { reason, detail } = deadReason(ix, t, dead);
  const refs = reason === "unreferenced_layer" ? (dead[0]!.refs ?? []) : [{ table: "thin_ids", key: id } as RowRef];
  const locked = dead.map((v) => v.locked).find((x) => x) ?? null;
  return { thinId: id, status: "dead", reason, detail, since, mustExist: false, refs, locked };
}

function thinEntries(ix: RowIndex, notes: string[]): Map<number, DbThin> {
  const fromOwners = ownerVerdicts(ix);
  const ledger = new Map(ix.rows.thinIds.map((t) => [t.thin_id, t]));
  const thins = new Map<number, DbThin>();
  for (const id of new Set<number>([...ledger.keys(), ...fromOwners.keys()])) {
    thins.set(id, thinEntry(ix, id, ledger.get(id), fromOwners.get(id) ?? [], notes));
  }
  return thins;
}

/** What the row that owns a device name (its snapshot, else its layer) says about the device. */
function deviceVerdict(ix: RowIndex, thinId: number, snap: SnapshotRow | undefined, layer: LayerRow | undefined, since: number): Verdict | null {
  if (snap && snap.thin_id === thinId) return snapVerdict(ix, snap);
  if (!layer || layer.thin_id !== thinId) return null;
  const v = layerVerdict(ix, layer);
  // a committed layer's device is deactivated before commit: an active one is a leftover
  if (v.live && layer.state === "committed")
    return { live: false, reason: "db_orphaned", detail: `${layerDesc(ix, layer)} is committed; its device should be inactive`, since };
  return v;
}

/** Device names from the devices table and from owner rows. */
function deviceEntries(ix: RowIndex): Map<string, DbDevice> {
  const { rows } = ix;
  const devices = new Map<string, DbDevice>();
  const devRows = new Map(rows.devices.map((d) => [d.name, d]));
  const snapByName = new Map<string, SnapshotRow>(); // the latest snapshot of that name
  for (const s of rows.snapshots) if (s.device_name) snapByName.set(s.device_name, s);
  const layerByName = new Map<string, LayerRow>(); // the first layer of that name
  for (const l of rows.layers) if (l.device_name && !layerByName.has(l.device_name)) layerByName.set(l.device_name, l);
  for (const name of new Set<string>([...devRows.keys(), ...snapByName.keys(), ...layerByName.keys()])) {
    const row = devRows.get(name);
    const snap = snapByName.get(name);
    const layer = layerByName.get(name);
    const thinId = row?.thin_id ?? snap?.thin_id ?? layer?.thin_id ?? null;
    if (thinId === null) continue;
    const since = Math.max(row?.updated_at ?? 0, snap?.updated_at ?? 0, layer?.updated_at ?? 0);
    const refs: RowRef[] = [...(row ? [{ table: "devices", key: name } as RowRef] : []), ...(snap ? [{ table: "snapshots", key: snap.id } as RowRef] : [])];
    const v = deviceVerdict(ix, thinId, snap, layer, since);
    const base = { name, thinId, since, refs };
    if (v?.live) {
      // whatever its device row says: only a release makes a handed-out snapshot's device optional
      devices.set(name, { ...base, status: "live", detail: v.detail, mustExist: !!snap && snap.state === "active", snapshotId: snap?.id ?? null });
    } else if (row?.state === "removed" && !v) {
      devices.set(name, { ...base, status: "removed", detail: "device row: removed", mustExist: false });
    } else {
      devices.set(name, {
        ...base,
        status: row?.state === "removed" ? "removed" : "dead",
        reason: v ? v.reason : row?.state === "leaked" ? "db_failed" : "owner_missing",
        detail: v ? v.detail : `device row: ${row?.state ?? "?"}${row?.reason ? ` (${row.reason})` : ""}; no owner row holds it`,
        mustExist: false,
        locked: v ? (v.locked ?? null) : null,
      });
    }
  }
  return devices;
}

function interruptedBuildNotes(ix: RowIndex): string[] {
  return ix.rows.layers
    .filter((l) => l.state === "building" && l.thin_id !== null && !builder(ix, l).alive)
    .map(
      (l) =>
        `${layerDesc(ix, l)} is an interrupted build (phase ${l.phase}, thin id ${l.thin_id}): collected as interrupted_build once older than the grace period; a re-run of the unpack then starts it afresh`,
    );
}

export function buildDbView(pool: string, rows: GcRows, alive: AliveFn): DbViewResult {
  const notes: string[] = [];
  const ix = indexRows(pool, rows, alive);
  const thins = thinEntries(ix, notes);
  const devices = deviceEntries(ix);
  const mounts: DbMount[] = rows.mounts.map((m) => ({ path: m.path, deviceName: m.device_name, state: m.state, since: m.updated_at }));
  notes.push(...interruptedBuildNotes(ix));
  return {
    view: {
      pool,
      known: rows.thinIds.length > 0 || rows.layers.length > 0,
      thins,
      devices,
      mounts,
      firstSeen: new Map((rows.firstSeen ?? []).map((r) => [r.thin_id, r.first_seen_at])),
      lastTxn: rows.lastTxn ?? null,
    },
    notes,
  };
}
