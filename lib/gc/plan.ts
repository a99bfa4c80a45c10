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

export function makePlan(inp: PlanInput): Plan {
  const { dm, meta, db, now, graceMs } = inp;
  const pool = dm.pool.name;
  const actions: Orphan[] = [];
  const skips: Skip[] = [];
  const repairs: Repair[] = [];
  const notes: string[] = [];

  const foreignIds = new Map<number, string>();
  for (const f of dm.foreign) if (f.thinId !== null) foreignIds.set(f.thinId, f.name);
  const ourDevsByThin = new Map<number, DmDevice[]>();
  for (const d of dm.ours) {
    if (!d.thin) continue;
    const l = ourDevsByThin.get(d.thin.thinId);
    if (l) l.push(d);
    else ourDevsByThin.set(d.thin.thinId, [d]);
  }
  const mapped = (id: number | null) => {
    if (id === null) return null;
    const b = meta.ids.get(id);
    return b === undefined || b === null ? null : b * meta.blockBytes;
  };

  // --- 1. devices: which active devices of ours are orphans (with or without their thin id) ---
  const candidates: Candidate[] = [];
  for (const d of dm.ours) {
    const dbDev = db.devices.get(d.name);
    if (!d.thin) {
      candidates.push({
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
      candidates.push({
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
    candidates.push({
      thinId: id,
      device: d,
      deleteThin: true,
      reason: why.reason,
      detail: why.detail,
      since: sinces.length ? Math.max(...sinces) : unknownSince(db, id, now),
      locked: dbDev?.locked ?? dbThin?.locked ?? null,
    });
  }

  // --- 2. thin ids in the metadata with no device of ours ---
  if (meta.status === "ok") {
    for (const id of [...meta.ids.keys()].sort((a, b) => a - b)) {
      if (ourDevsByThin.has(id)) continue; // decided with its device(s) above
      const dbThin = db.thins.get(id);
      if (dbThin?.status === "live") continue;
      const why = thinOrphanReason(dbThin);
      candidates.push({
        thinId: id,
        device: null,
        deleteThin: true,
        reason: why.reason,
        detail: why.detail,
        since: dbThin?.since ?? unknownSince(db, id, now),
        locked: dbThin?.locked ?? null,
      });
    }
  }

  // --- 3. skip rules ---
  const skippedThin = new Map<number, string>(); // thin id → why its delete must wait
  const accepted: Candidate[] = [];
  const skip = (c: Candidate, reason: SkipReason, detail: string) => {
    skips.push({ thinId: c.thinId, device: c.device?.name ?? null, reason, detail, orphanReason: c.reason });
    if (c.thinId !== null && c.deleteThin) skippedThin.set(c.thinId, c.device ? `device ${c.device.name} was skipped (${reason})` : reason);
  };
  // the pool has seen pool changes the DB has no record of (a state.db restored from a backup, a
  // second state dir on the pool): ids it does not know prove nothing
  const poolTxn = meta.transactionId ?? null;
  const behind = db.known && poolTxn !== null && poolTxn > (db.lastTxn ?? 0);
  if (behind)
    notes.push(
      `the DB is behind the pool: pool transaction id ${poolTxn}, the DB's last recorded ${db.lastTxn ?? "none"} (restored from a backup?); unknown thin ids are left for a human`,
    );
  for (const c of candidates) {
    const age = c.since === null ? null : now - c.since;
    const firstSeenNow = c.reason === "not_in_db" && c.thinId !== null && !db.firstSeen?.has(c.thinId);
    const foreignUser = c.thinId !== null && c.deleteThin ? foreignIds.get(c.thinId) : undefined;
    const ms = c.device ? (inp.mounts.get(c.device.name) ?? []) : [];
    const theirs = ms.filter((m) => !m.ours);
    if (foreignUser && !c.device) {
      skip(c, "foreign", `thin id ${c.thinId} is mapped by foreign device ${foreignUser}`);
    } else if (c.reason === "not_in_db" && !db.known) {
      skip(c, "db_unknown", `the state DB has no thin ids for pool ${pool}: is --state-dir right? refusing to treat unknown ids as orphans`);
    } else if (c.reason === "not_in_db" && behind) {
      skip(
        c,
        "db_unknown",
        `DB behind: the pool's transaction id is ${poolTxn}, the DB's last recorded one ${db.lastTxn ?? "none"} (state.db restored from a backup, or another state dir on this pool?): an id the DB does not know may be live`,
      );
    } else if (age !== null && age < graceMs) {
      skip(
        c,
        "too_young",
        firstSeenNow
          ? `first seen in the pool now, grace period ${fmtAge(graceMs)}: a --force run records it and a later run takes it`
          : c.reason === "not_in_db"
            ? `first seen in the pool ${fmtAge(age)} ago, grace period ${fmtAge(graceMs)}; next run`
            : `last changed ${fmtAge(age)} ago, grace period ${fmtAge(graceMs)}: may be work in flight; next run`,
      );
    } else if (c.locked) {
      skip(c, "locked", `${c.locked}; next run`);
    } else if (c.device && theirs.length) {
      skip(c, "mounted", `mounted at ${theirs.map((m) => m.mountPoint).join(", ")} (not thinimg's mount dir): unmount it, or find who uses it`);
    } else if (c.device?.suspended) {
      skip(c, "suspended", "device is suspended: someone is in the middle of a dm operation, or one died; resume it by hand once understood");
    } else if (c.device?.inactiveTable) {
      skip(c, "reload_pending", "an inactive table is loaded (a reload never resumed): inspect with `dmsetup table --inactive`");
    } else if (c.device && c.device.open > (ms.length > 0 ? 1 : 0)) {
      skip(c, "open", `open count ${c.device.open}${ms.length ? " beyond our own mount" : ""}: a process, VM or holder device uses it`);
    } else if (foreignUser) {
      // our stale device may go; the id stays while something foreign maps it
      skips.push({
        thinId: c.thinId,
        device: null,
        reason: "foreign",
        detail: `thin id ${c.thinId} is also mapped by foreign device ${foreignUser}: kept`,
        orphanReason: c.reason,
      });
      accepted.push({ ...c, deleteThin: false, detail: `${c.detail}; thin id kept (mapped by foreign device ${foreignUser})` });
    } else accepted.push(c);
  }

  // a thin id with a skipped device keeps its other devices' deletes from going ahead
  for (const c of accepted) {
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
    actions.push({
      thinId: c.thinId,
      device: c.device?.name ?? null,
      unmount: c.device ? (inp.mounts.get(c.device.name) ?? []).filter((m) => m.ours).map((m) => m.mountPoint) : [],
      deleteThin: c.deleteThin,
      reason: c.reason,
      detail: c.detail,
      ageMs: c.since === null ? null : now - c.since,
      mappedBytes: c.deleteThin ? mapped(c.thinId) : null,
    });
  }
  // several devices on one id: remove them all before the single delete
  const byId = new Map<number, Orphan[]>();
  for (const a of actions) if (a.thinId !== null && a.deleteThin) byId.set(a.thinId, [...(byId.get(a.thinId) ?? []), a]);
  for (const list of byId.values()) for (const a of list.slice(0, -1)) a.deleteThin = false;
  actions.sort(
    (a, b) => Number(a.device === null) - Number(b.device === null) || (a.thinId ?? -1) - (b.thinId ?? -1) || Number(a.deleteThin) - Number(b.deleteThin),
  );

  // --- 4. repairs: the DB says something exists that is gone ---
  const older = (since: number) => since < inp.scannedAt;
  const devNames = new Set(dm.ours.map((d) => d.name));
  const inPool = (id: number) => meta.ids.has(id) || ourDevsByThin.has(id) || foreignIds.has(id);
  if (meta.status === "ok") {
    let gone = 0;
    for (const t of db.thins.values()) {
      if (inPool(t.thinId) || !older(t.since) || t.locked) continue;
      if (t.status === "live" && t.mustExist) {
        gone++;
        repairs.push({
          kind: "thin_gone",
          thinId: t.thinId,
          device: null,
          path: null,
          detail: `${t.detail}: thin id ${t.thinId} is not in the pool (pool recreated, or deleted outside thinimg); marked failed/gone`,
          refs: t.refs,
        });
      } else if (t.status === "dead") {
        repairs.push({
          kind: "thin_already_deleted",
          thinId: t.thinId,
          device: null,
          path: null,
          detail: `thin id ${t.thinId} (${t.detail}) is already gone from the pool; ledger marked deleted`,
          refs: t.refs,
        });
      }
    }
    const liveCount = [...db.thins.values()].filter((t) => t.status === "live" && t.mustExist).length;
    if (gone > 0 && gone === liveCount && meta.ids.size === 0) {
      notes.push(`pool ${pool} has no thin ids at all while the DB holds ${gone} live: the pool was recreated; the DB is repaired to match`);
    }
  }
  const detached: Detached[] = [];
  for (const d of db.devices.values()) {
    if (d.status !== "live" || !d.mustExist || devNames.has(d.name)) continue;
    if (meta.status === "ok" && !inPool(d.thinId)) continue; // its data is gone too: thin_gone above
    const ref = d.snapshotId ?? d.name;
    detached.push({
      snapshotId: d.snapshotId ?? null,
      thinId: d.thinId,
      device: d.name,
      detail: `${d.detail}, but /dev/mapper/${d.name} is not loaded (host rebooted, or removed by hand); thin id ${d.thinId} is kept: re-attach it with \`bun scripts/activate.ts --snapshot ${ref}\`, or release it`,
    });
  }
  for (const d of db.devices.values()) {
    // e.g. a leaked layer device an operator removed by hand while repairing the pool: the row would
    // say "leaked" forever. Only its device row is touched; the thin id has its own verdict.
    const rowRefs = d.refs.filter((r) => r.table === "devices");
    if (d.status === "dead" && rowRefs.length > 0 && !devNames.has(d.name) && older(d.since)) {
      repairs.push({
        kind: "device_row_gone",
        thinId: null,
        device: d.name,
        path: null,
        detail: `${d.detail}: /dev/mapper/${d.name} no longer exists; marked removed`,
        refs: rowRefs,
      });
    }
  }
  for (const m of db.mounts) {
    if (
      (m.state === "mounted" || m.state === "mounting" || m.state === "leaked" || m.state === "unmounting") &&
      !inp.mountPoints.has(m.path) &&
      older(m.since)
    ) {
      repairs.push({
        kind: "mount_gone",
        thinId: null,
        device: m.deviceName,
        path: m.path,
        detail: `${m.path} is no longer mounted; marked unmounted`,
        refs: [{ table: "mounts", key: m.path }],
      });
    }
  }

  if (meta.skipped) notes.push(`inactive leaks not scanned: ${meta.skipped.detail}`);
  if (meta.staleHold?.released) notes.push(`released a stale metadata snapshot (root ${meta.staleHold.heldRoot}) left by a previous run`);
  if (!db.known) notes.push(`the state DB has no thin ids recorded for pool ${pool}`);

  return { pool, actions, skips, repairs, detached, foreign: dm.foreign, notes };
}
