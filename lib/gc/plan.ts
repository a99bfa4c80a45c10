// The decision: pure, no I/O. Given what the kernel shows (dm devices, thin ids in the metadata,
// mounts) and what the DB holds, list every orphan with the reason it is one, every orphan that is
// left alone this run (and why), every DB row to repair, and the foreign devices we never touch.
//
// Rules, in the order they bite:
//  - foreign devices (no prefix on our pool, or our prefix on something else) are never actions, and
//    a thin id any foreign device maps is never deleted;
//  - a thin id is live when the DB says so (committed layer, active snapshot, work in flight);
//    everything else in the pool is an orphan — including ids the DB has never heard of;
//  - an active device of ours that the DB does not hold is removed; its thin id is deleted too
//    unless the id itself is live (then only the stale device goes);
//  - an orphan is skipped when it is younger than the grace period, mounted outside our mount dir,
//    open, suspended or has a reload pending; a thin id whose device is skipped is kept too;
//  - when the DB knows nothing at all about the pool, ids it "doesn't know" prove nothing (wrong
//    --state-dir?): they are skipped and a human is asked;
//  - DB rows that say something exists which the scans show is gone are repaired — only rows last
//    changed before the scans began, so work that started after our snapshot is never "repaired";
//  - a snapshot handed to a user whose device is not loaded (a reboot) is detached: listed for
//    re-attach, its thin id live — only its user's release makes its data garbage.
import type { DbThin, DbView, Detached, DmDevice, DmScan, MetaScan, MountRef, Orphan, OrphanReason, Plan, Repair, Skip, SkipReason } from "./model.ts";

export const DEFAULT_GRACE_MS = 10 * 60_000;

export interface PlanInput {
  dm: DmScan;
  meta: MetaScan;
  /** device name → mounts (see mounts.ts). */
  mounts: Map<string, MountRef[]>;
  /** Every mount point in this namespace (to repair DB mount rows). */
  mountPoints: Set<string>;
  db: DbView;
  now: number;
  graceMs: number;
  /** When the scans began: DB rows changed later are newer than what the scans saw. */
  scannedAt: number;
}

interface Candidate {
  thinId: number | null;
  device: DmDevice | null;
  deleteThin: boolean;
  reason: OrphanReason;
  detail: string;
  since: number | null;
  /** A live named-lock holder may resume it (see db-view.ts). */
  locked?: string | null;
}

const fmtAge = (ms: number) => (ms < 120_000 ? `${Math.round(ms / 1000)}s` : `${Math.round(ms / 60_000)}m`);

function thinOrphanReason(t: DbThin | undefined): { reason: OrphanReason; detail: string } {
  if (!t) return { reason: "not_in_db", detail: "the DB has no record of this thin id" };
  return { reason: t.reason ?? "db_orphaned", detail: t.detail };
}

/**
 * An id the DB has never heard of has no DB row to age from: its age counts from when GC first saw
 * it in the pool (GC's side table, written by --force runs). Never seen before: first seen now.
 */
function unknownSince(db: DbView, id: number, now: number): number {
  return db.firstSeen?.get(id) ?? now;
}

/** What the scans say about thin ids, looked up by every step. */
interface ScanIndex {
  /** thin id → the foreign device that maps it */
  foreignIds: Map<number, string>;
  ourDevsByThin: Map<number, DmDevice[]>;
  /** The pool has this id (metadata, one of our devices, or a foreign device maps it). */
  inPool(id: number): boolean;
}

function indexScans(dm: DmScan, meta: MetaScan): ScanIndex {
  const foreignIds = new Map<number, string>();
  for (const f of dm.foreign) if (f.thinId !== null) foreignIds.set(f.thinId, f.name);
  const ourDevsByThin = new Map<number, DmDevice[]>();
  for (const d of dm.ours) {
    if (!d.thin) continue;
    ourDevsByThin.set(d.thin.thinId, [...(ourDevsByThin.get(d.thin.thinId) ?? []), d]);
  }
  return { foreignIds, ourDevsByThin, inPool: (id) => meta.ids.has(id) || ourDevsByThin.has(id) || foreignIds.has(id) };
}

/** 1. Which active devices of ours are orphans (with or without their thin id). */
function deviceCandidates(inp: PlanInput): Candidate[] {
  const { dm, db, now } = inp;
  const out: Candidate[] = [];
  for (const d of dm.ours) {
    const dbDev = db.devices.get(d.name);
    if (!d.thin) {
      out.push({
        thinId: null,
        device: d,
        deleteThin: false,
        reason: "no_table",
        detail: "device has no live table (a create that never loaded it)",
        since: dbDev?.since ?? null,
      });
      continue;
    }
    const id = d.thin.thinId;
    const dbThin = db.thins.get(id);
    if (dbDev && dbDev.status === "live" && dbDev.thinId === id) continue; // the DB holds this device
    if (dbThin?.status === "live") {
      out.push({
        thinId: id,
        device: d,
        deleteThin: false,
        reason: "device_not_held",
        detail: `thin id ${id} is live (${dbThin.detail}) but the DB does not hold this device${dbDev ? ` (its row: ${dbDev.detail})` : ""}: only the device is removed`,
        since: Math.max(dbThin.since, dbDev?.since ?? 0),
      });
      continue;
    }
    const why = dbDev && dbDev.status !== "live" && dbDev.reason ? { reason: dbDev.reason as OrphanReason, detail: dbDev.detail } : thinOrphanReason(dbThin);
    const sinces = [dbThin?.since, dbDev?.since].filter((x): x is number => x !== undefined);
    out.push({
      thinId: id,
      device: d,
      deleteThin: true,
      reason: why.reason,
      detail: why.detail,
      since: sinces.length ? Math.max(...sinces) : unknownSince(db, id, now),
      locked: dbDev?.locked ?? dbThin?.locked ?? null,
    });
  }
  return out;
}

/** 2. Thin ids in the metadata with no device of ours. */
function metadataCandidates(inp: PlanInput, idx: ScanIndex): Candidate[] {
  const { meta, db, now } = inp;
  if (meta.status !== "ok") return [];
  const out: Candidate[] = [];
  for (const id of [...meta.ids.keys()].sort((a, b) => a - b)) {
    if (idx.ourDevsByThin.has(id)) continue; // decided with its device(s) above
    const dbThin = db.thins.get(id);
    if (dbThin?.status === "live") continue;
    const why = thinOrphanReason(dbThin);
    out.push({
      thinId: id,
      device: null,
      deleteThin: true,
      reason: why.reason,
      detail: why.detail,
      since: dbThin?.since ?? unknownSince(db, id, now),
      locked: dbThin?.locked ?? null,
    });
  }
  return out;
}

/** The pool saw changes the DB has no record of (a state.db restored from a backup, a second
 * state dir on the pool): ids it does not know prove nothing. */
function dbBehind(inp: PlanInput): { behind: boolean; poolTxn: number | null } {
  const poolTxn = inp.meta.transactionId ?? null;
  return { behind: inp.db.known && poolTxn !== null && poolTxn > (inp.db.lastTxn ?? 0), poolTxn };
}

/** 3a. Why an orphan must wait this run (null: it may go). */
function skipReason(inp: PlanInput, idx: ScanIndex, c: Candidate): { reason: SkipReason; detail: string } | null {
  const { db, now, graceMs } = inp;
  const { behind, poolTxn } = dbBehind(inp);
  const age = c.since === null ? null : now - c.since;
  const firstSeenNow = c.reason === "not_in_db" && c.thinId !== null && !db.firstSeen?.has(c.thinId);
  const foreignUser = c.thinId !== null && c.deleteThin ? idx.foreignIds.get(c.thinId) : undefined;
  const ms = c.device ? (inp.mounts.get(c.device.name) ?? []) : [];
  const theirs = ms.filter((m) => !m.ours);
  if (foreignUser && !c.device) return { reason: "foreign", detail: `thin id ${c.thinId} is mapped by foreign device ${foreignUser}` };
  if (c.reason === "not_in_db" && !db.known) {
    return {
      reason: "db_unknown",
      detail: `the state DB has no thin ids for pool ${inp.dm.pool.name}: is --state-dir right? refusing to treat unknown ids as orphans`,
    };
  }
  if (c.reason === "not_in_db" && behind) {
    return {
      reason: "db_unknown",
      detail: `DB behind: the pool's transaction id is ${poolTxn}, the DB's last recorded one ${db.lastTxn ?? "none"} (state.db restored from a backup, or another state dir on this pool?): an id the DB does not know may be live`,
    };
  }
  if (age !== null && age < graceMs) {
    const detail = firstSeenNow
      ? `first seen in the pool now, grace period ${fmtAge(graceMs)}: a --force run records it and a later run takes it`
      : c.reason === "not_in_db"
        ? `first seen in the pool ${fmtAge(age)} ago, grace period ${fmtAge(graceMs)}; next run`
        : `last changed ${fmtAge(age)} ago, grace period ${fmtAge(graceMs)}: may be work in flight; next run`;
    return { reason: "too_young", detail };
  }
  if (c.locked) return { reason: "locked", detail: `${c.locked}; next run` };
  if (c.device && theirs.length) {
    return { reason: "mounted", detail: `mounted at ${theirs.map((m) => m.mountPoint).join(", ")} (not thinimg's mount dir): unmount it, or find who uses it` };
  }
  if (c.device?.suspended)
    return { reason: "suspended", detail: "device is suspended: someone is in the middle of a dm operation, or one died; resume it by hand once understood" };
  if (c.device?.inactiveTable)
    return { reason: "reload_pending", detail: "an inactive table is loaded (a reload never resumed): inspect with `dmsetup table --inactive`" };
  if (c.device && c.device.open > (ms.length > 0 ? 1 : 0)) {
    return { reason: "open", detail: `open count ${c.device.open}${ms.length ? " beyond our own mount" : ""}: a process, VM or holder device uses it` };
  }
  return null;
}

/** 3b. The skip rules over every candidate; what is left becomes an action. */
function decide(inp: PlanInput, idx: ScanIndex, candidates: Candidate[]): { actions: Orphan[]; skips: Skip[] } {
  const skips: Skip[] = [];
  const skippedThin = new Map<number, string>(); // thin id → why its delete must wait
  const accepted: Candidate[] = [];
  for (const c of candidates) {
    const why = skipReason(inp, idx, c);
    if (why) {
      skips.push({ thinId: c.thinId, device: c.device?.name ?? null, reason: why.reason, detail: why.detail, orphanReason: c.reason });
      if (c.thinId !== null && c.deleteThin) skippedThin.set(c.thinId, c.device ? `device ${c.device.name} was skipped (${why.reason})` : why.reason);
      continue;
    }
    const foreignUser = c.thinId !== null && c.deleteThin ? idx.foreignIds.get(c.thinId) : undefined;
    if (!foreignUser) {
      accepted.push(c);
      continue;
    }
    // our stale device may go; the id stays while something foreign maps it
    skips.push({
      thinId: c.thinId,
      device: null,
      reason: "foreign",
      detail: `thin id ${c.thinId} is also mapped by foreign device ${foreignUser}: kept`,
      orphanReason: c.reason,
    });
    accepted.push({ ...c, deleteThin: false, detail: `${c.detail}; thin id kept (mapped by foreign device ${foreignUser})` });
  }
  const actions: Orphan[] = [];
  for (const c of accepted) {
    // a thin id with a skipped device keeps its other devices' deletes from going ahead
    if (c.thinId !== null && c.deleteThin && skippedThin.has(c.thinId)) {
      skips.push({
        thinId: c.thinId,
        device: c.device?.name ?? null,
        reason: "device_skipped",
        detail: `${skippedThin.get(c.thinId)}; the thin id is kept until it can go`,
        orphanReason: c.reason,
      });
      continue;
    }
    actions.push(toAction(inp, c));
  }
  return { actions: ordered(actions), skips };
}

function toAction(inp: PlanInput, c: Candidate): Orphan {
  const blocks = c.thinId === null ? undefined : inp.meta.ids.get(c.thinId);
  return {
    thinId: c.thinId,
    device: c.device?.name ?? null,
    unmount: c.device ? (inp.mounts.get(c.device.name) ?? []).filter((m) => m.ours).map((m) => m.mountPoint) : [],
    deleteThin: c.deleteThin,
    reason: c.reason,
    detail: c.detail,
    ageMs: c.since === null ? null : inp.now - c.since,
    mappedBytes: c.deleteThin && blocks !== undefined && blocks !== null ? blocks * inp.meta.blockBytes : null,
  };
}

/** Devices before inactive ids; several devices on one id: all removed before the single delete. */
function ordered(actions: Orphan[]): Orphan[] {
  const byId = new Map<number, Orphan[]>();
  for (const a of actions) if (a.thinId !== null && a.deleteThin) byId.set(a.thinId, [...(byId.get(a.thinId) ?? []), a]);
  for (const list of byId.values()) for (const a of list.slice(0, -1)) a.deleteThin = false;
  return actions.sort(
    (a, b) => Number(a.device === null) - Number(b.device === null) || (a.thinId ?? -1) - (b.thinId ?? -1) || Number(a.deleteThin) - Number(b.deleteThin),
  );
}

/** 4a. Thin ids the DB holds that the pool no longer has. */
function thinRepairs(inp: PlanInput, idx: ScanIndex, notes: string[]): Repair[] {
  const { meta, db } = inp;
  if (meta.status !== "ok") return [];
  const repairs: Repair[] = [];
  let gone = 0;
  for (const t of db.thins.values()) {
    if (idx.inPool(t.thinId) || t.since >= inp.scannedAt || t.locked) continue;
    if (t.status === "live" && t.mustExist) {
      gone++;
      const detail = `${t.detail}: thin id ${t.thinId} is not in the pool (pool recreated, or deleted outside thinimg); marked failed/gone`;
      repairs.push({ kind: "thin_gone", thinId: t.thinId, device: null, path: null, detail, refs: t.refs });
    } else if (t.status === "dead") {
      const detail = `thin id ${t.thinId} (${t.detail}) is already gone from the pool; ledger marked deleted`;
      repairs.push({ kind: "thin_already_deleted", thinId: t.thinId, device: null, path: null, detail, refs: t.refs });
    }
  }
  const liveCount = [...db.thins.values()].filter((t) => t.status === "live" && t.mustExist).length;
  if (gone > 0 && gone === liveCount && meta.ids.size === 0) {
    notes.push(`pool ${inp.dm.pool.name} has no thin ids at all while the DB holds ${gone} live: the pool was recreated; the DB is repaired to match`);
  }
  return repairs;
}

/** 4b. Device and mount rows that say something exists which is gone (only rows older than the scans). */
function rowRepairs(inp: PlanInput): Repair[] {
  const older = (since: number) => since < inp.scannedAt;
  const devNames = new Set(inp.dm.ours.map((d) => d.name));
  const repairs: Repair[] = [];
  for (const d of inp.db.devices.values()) {
    // e.g. a leaked layer device an operator removed by hand while repairing the pool: the row would
    // say "leaked" forever. Only its device row is touched; the thin id has its own verdict.
    const rowRefs = d.refs.filter((r) => r.table === "devices");
    if (d.status === "dead" && rowRefs.length > 0 && !devNames.has(d.name) && older(d.since)) {
      const detail = `${d.detail}: /dev/mapper/${d.name} no longer exists; marked removed`;
      repairs.push({ kind: "device_row_gone", thinId: null, device: d.name, path: null, detail, refs: rowRefs });
    }
  }
  const live = new Set(["mounted", "mounting", "leaked", "unmounting"]);
  for (const m of inp.db.mounts) {
    if (!live.has(m.state) || inp.mountPoints.has(m.path) || !older(m.since)) continue;
    const detail = `${m.path} is no longer mounted; marked unmounted`;
    repairs.push({ kind: "mount_gone", thinId: null, device: m.deviceName, path: m.path, detail, refs: [{ table: "mounts", key: m.path }] });
  }
  return repairs;
}

/** 5. Handed-out snapshots whose device is not loaded: kept, listed for re-attach. */
function detachedSnapshots(inp: PlanInput, idx: ScanIndex): Detached[] {
  const devNames = new Set(inp.dm.ours.map((d) => d.name));
  const out: Detached[] = [];
  for (const d of inp.db.devices.values()) {
    if (d.status !== "live" || !d.mustExist || devNames.has(d.name)) continue;
    if (inp.meta.status === "ok" && !idx.inPool(d.thinId)) continue; // its data is gone too: thin_gone
    const ref = d.snapshotId ?? d.name;
    out.push({
      snapshotId: d.snapshotId ?? null,
      thinId: d.thinId,
      device: d.name,
      detail: `${d.detail}, but /dev/mapper/${d.name} is not loaded (host rebooted, or removed by hand); thin id ${d.thinId} is kept: re-attach it with \`bun scripts/activate.ts --snapshot ${ref}\`, or release it`,
    });
  }
  return out;
}

export function makePlan(inp: PlanInput): Plan {
  const { dm, meta, db } = inp;
  const pool = dm.pool.name;
  const notes: string[] = [];
  const idx = indexScans(dm, meta);
  const { behind, poolTxn } = dbBehind(inp);
  if (behind) {
    notes.push(
      `the DB is behind the pool: pool transaction id ${poolTxn}, the DB's last recorded ${db.lastTxn ?? "none"} (restored from a backup?); unknown thin ids are left for a human`,
    );
  }
  const { actions, skips } = decide(inp, idx, [...deviceCandidates(inp), ...metadataCandidates(inp, idx)]);
  const repairs = [...thinRepairs(inp, idx, notes), ...rowRepairs(inp)];
  const detached = detachedSnapshots(inp, idx);
  if (meta.skipped) notes.push(`inactive leaks not scanned: ${meta.skipped.detail}`);
  if (meta.staleHold?.released) notes.push(`released a stale metadata snapshot (root ${meta.staleHold.heldRoot}) left by a previous run`);
  if (!db.known) notes.push(`the state DB has no thin ids recorded for pool ${pool}`);
  return { pool, actions, skips, repairs, detached, foreign: dm.foreign, notes };
}
