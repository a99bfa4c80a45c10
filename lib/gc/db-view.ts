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
import type { DbDeadReason, DbDevice, DbMount, DbThin, DbView, RowRef } from "./model.ts";

export type AliveFn = (pid: number, startTime: number | null, host: string | null) => boolean;

export interface DbViewResult {
  view: DbView;
  /** Things worth telling an operator (interrupted builds that wait for a re-run, DB contradictions). */
  notes: string[];
}

export function buildDbView(pool: string, rows: GcRows, alive: AliveFn): DbViewResult {
  const notes: string[] = [];
  const layers = new Map(rows.layers.map((l) => [l.id, l]));
  const snaps = new Map(rows.snapshots.map((s) => [s.id, s]));
  const imageName = new Map(rows.images.map((i) => [i.id, i.name]));
  const imagesOf = new Map<number, number[]>();
  for (const r of rows.imageLayers) imagesOf.set(r.layer_id, [...(imagesOf.get(r.layer_id) ?? []), r.image_id]);
  const activateWork = new Map<number, (typeof rows.runningWork)[number]>();
  for (const w of rows.runningWork) {
    if (w.kind !== "activate") continue;
    const s = parseWorkSubject(w.subject);
    if (s?.kind === "snapshot") activateWork.set(s.id, w);
  }

  const layerDesc = (l: LayerRow) => {
    const imgs = (imagesOf.get(l.id) ?? []).map((i) => imageName.get(i) ?? `#${i}`);
    return `layer ${l.id}${imgs.length ? ` (image ${imgs.join(", ")})` : ""}`;
  };
  const snapDesc = (s: SnapshotRow) => `snapshot ${s.id} of image ${imageName.get(s.image_id) ?? `#${s.image_id}`}`;
  const snapInFlight = (s: SnapshotRow) => {
    const w = activateWork.get(s.id);
    if (w) return alive(w.pid, w.start_time, w.host);
    return s.pid !== null && alive(s.pid, null, null);
  };

  type Verdict =
    | { live: true; mustExist: boolean; detail: string; since: number; refs: RowRef[] }
    | { live: false; reason: DbDeadReason; detail: string; since: number; locked?: string | null; refs?: RowRef[] };

  // Named locks: a live holder of a layer chain's lock is building (or about to resume) it; a live
  // holder of any image lock of this pool may reach any unfinished layer chain (chains are shared
  // between images, and an image's layer list is only recorded once it is ready).
  const lockRows = rows.locks ?? [];
  const liveLock = (key: string) => {
    const r = lockRows.find((x) => x.key === key);
    return r && alive(r.pid, r.start_time, r.host) ? r : null;
  };
  const liveImageLocks = lockRows.filter((r) => isImageLockKey(pool, r.key) && alive(r.pid, r.start_time, r.host));
  const holderDesc = (r: { key: string; pid: number; command: string; acquired_at: number }) =>
    `${r.key} held by pid ${r.pid} (${r.command}) since ${new Date(r.acquired_at).toISOString()}`;
  /** Why an unfinished layer must be left alone this run (null: nobody may resume it now). */
  const layerLocked = (l: LayerRow): string | null => {
    const own = liveLock(layerLockKey(pool, l.chain_id));
    if (own) return holderDesc(own);
    if (liveImageLocks.length) return `${holderDesc(liveImageLocks[0]!)}: an unpack in progress may resume this layer`;
    return null;
  };
  const buildWork = new Map((rows.buildWork ?? []).map((w) => [w.subject, w]));
  /** The process building a layer: its lock holder or its running build work; null when none is alive. */
  const builder = (l: LayerRow): { alive: boolean; pid: number | null } => {
    const lock = lockRows.find((x) => x.key === layerLockKey(pool, l.chain_id));
    if (lock && alive(lock.pid, lock.start_time, lock.host)) return { alive: true, pid: lock.pid };
    const w = buildWork.get(workSubject("layer", l.id)) ?? rows.runningWork.find((x) => x.kind === "build_layer" && x.subject === workSubject("layer", l.id));
    if (w && w.state === "running" && alive(w.pid, w.start_time, w.host)) return { alive: true, pid: w.pid };
    return { alive: false, pid: lock?.pid ?? w?.pid ?? null };
  };

  const unreferenced = unreferencedLayers(pool, rows, alive);
  /** What an owner row says about the thin id it references. */
  const layerVerdict = (l: LayerRow): Verdict => {
    const refs: RowRef[] = [
      { table: "layers", key: l.id },
      { table: "thin_ids", key: l.thin_id! },
      ...(imagesOf.get(l.id) ?? []).map((i): RowRef => ({ table: "images", key: i })),
    ];
    const u = unreferenced.get(l.id);
    if (u)
      return {
        live: false,
        reason: "unreferenced_layer",
        detail: u.detail,
        since: u.since,
        locked: u.locked,
        refs: [
          { table: "thin_ids", key: u.thinId },
          { table: "layers", key: l.id },
        ],
      };
    if (l.state === "committed") return { live: true, mustExist: true, detail: `${layerDesc(l)} committed`, since: l.updated_at, refs };
    if (l.state === "building") {
      const b = builder(l);
      if (b.alive) return { live: true, mustExist: false, detail: `${layerDesc(l)} building (phase ${l.phase}, pid ${b.pid})`, since: l.updated_at, refs };
      return {
        live: false,
        reason: "interrupted_build",
        detail: `${layerDesc(l)}: interrupted build (phase ${l.phase}), builder ${b.pid === null ? "unknown" : `pid ${b.pid}`} dead since ${new Date(l.updated_at).toISOString()}`,
        since: l.updated_at,
        locked: layerLocked(l),
      };
    }
    return {
      live: false,
      reason: "db_failed",
      detail: `${layerDesc(l)} failed${l.error ? `: ${l.error.slice(0, 160)}` : ""}`,
      since: l.updated_at,
      locked: layerLocked(l),
    };
  };
  const snapVerdict = (s: SnapshotRow): Verdict => {
    const refs: RowRef[] = [
      { table: "snapshots", key: s.id },
      { table: "thin_ids", key: s.thin_id! },
      ...(s.device_name ? [{ table: "devices", key: s.device_name } as RowRef] : []),
    ];
    if (s.state === "active") return { live: true, mustExist: true, detail: `${snapDesc(s)} active`, since: s.updated_at, refs };
    if (s.state === "pending") {
      if (snapInFlight(s)) return { live: true, mustExist: false, detail: `${snapDesc(s)} being activated (pid ${s.pid})`, since: s.updated_at, refs };
      return { live: false, reason: "db_failed", detail: `${snapDesc(s)}: activation interrupted (pid ${s.pid} is gone)`, since: s.updated_at };
    }
    if (s.state === "released") return { live: false, reason: "db_released", detail: `${snapDesc(s)} released`, since: s.updated_at };
    return { live: false, reason: "db_failed", detail: `${snapDesc(s)} failed${s.error ? `: ${s.error.slice(0, 160)}` : ""}`, since: s.updated_at };
  };

  // thin id → verdicts from every row that references it
  const fromOwners = new Map<number, Verdict[]>();
  const add = (id: number | null, v: Verdict) => {
    if (id === null) return;
    fromOwners.set(id, [...(fromOwners.get(id) ?? []), v]);
  };
  for (const l of rows.layers) add(l.thin_id, layerVerdict(l));
  for (const s of rows.snapshots) add(s.thin_id, snapVerdict(s));

  const thins = new Map<number, DbThin>();
  const ledger = new Map(rows.thinIds.map((t) => [t.thin_id, t]));
  const ids = new Set<number>([...ledger.keys(), ...fromOwners.keys()]);
  for (const id of ids) {
    const t = ledger.get(id);
    const vs = fromOwners.get(id) ?? [];
    const live = vs.filter((v): v is Extract<Verdict, { live: true }> => v.live);
    const ledgerSince = t?.updated_at ?? 0;
    if (live.length) {
      const mustExist = live.some((v) => v.mustExist) && t?.state !== "allocated";
      const refs = live.flatMap((v) => v.refs);
      thins.set(id, {
        thinId: id,
        status: "live",
        detail: live.map((v) => v.detail).join("; "),
        since: Math.max(ledgerSince, ...live.map((v) => v.since)),
        mustExist,
        refs,
      });
      if (t && (t.state === "orphaned" || t.state === "deleting" || t.state === "deleted")) {
        notes.push(`thin id ${id}: ledger says ${t.state} but ${live[0]!.detail}: kept`);
      }
      continue;
    }
    const dead = vs as Extract<Verdict, { live: false }>[];
    const since = Math.max(ledgerSince, ...dead.map((v) => v.since));
    const locked = dead.map((v) => v.locked).find((x) => x) ?? null;
    if (t?.state === "deleted") {
      thins.set(id, {
        thinId: id,
        status: "deleted",
        reason: "db_deleted",
        detail: "ledger says GC deleted it",
        since,
        mustExist: false,
        refs: [{ table: "thin_ids", key: id }],
      });
      continue;
    }
    let reason: DbDeadReason;
    let detail: string;
    if (t?.state === "deleting") {
      reason = "db_deleting";
      detail = "a previous GC run sent the delete but did not confirm it";
    } else if (dead.length) {
      // the owner row says most (released, failed); the ledger's reason adds the rest
      reason = dead[0]!.reason;
      detail = dead.map((v) => v.detail).join("; ");
    } else if (t?.state === "orphaned") {
      reason = "db_orphaned";
      detail = `ledger: orphaned${t.reason ? ` (${t.reason})` : ""}`;
    } else if (t && t.owner_kind !== "none" && t.owner_id !== null) {
      // the ledger names an owner, but no owner row references this id
      const owner = t.owner_kind === "layer" ? layers.get(t.owner_id) : snaps.get(t.owner_id);
      if (!owner) {
        reason = "owner_missing";
        detail = `ledger says ${t.owner_kind} ${t.owner_id} owns it, but that row no longer exists`;
      } else {
        reason = "db_orphaned";
        detail = `superseded: ${t.owner_kind} ${t.owner_id} now uses thin id ${owner.thin_id ?? "none"}`;
      }
    } else {
      reason = "db_orphaned";
      detail = `ledger: ${t?.state ?? "?"} with no owner${t?.reason ? ` (${t.reason})` : ""}`;
    }
    const refs = reason === "unreferenced_layer" ? (dead[0]!.refs ?? []) : [{ table: "thin_ids", key: id } as RowRef];
    thins.set(id, { thinId: id, status: "dead", reason, detail, since, mustExist: false, refs, locked });
  }

  // devices: names from the devices table and from owner rows
  const devices = new Map<string, DbDevice>();
  const devRows = new Map(rows.devices.map((d) => [d.name, d]));
  const names = new Set<string>([
    ...devRows.keys(),
    ...rows.snapshots.filter((s) => s.device_name).map((s) => s.device_name!),
    ...rows.layers.filter((l) => l.device_name).map((l) => l.device_name!),
  ]);
  for (const name of names) {
    const row = devRows.get(name);
    const snap = rows.snapshots.filter((s) => s.device_name === name).at(-1);
    const layer = rows.layers.find((l) => l.device_name === name);
    const thinId = row?.thin_id ?? snap?.thin_id ?? layer?.thin_id ?? null;
    if (thinId === null) continue;
    const since = Math.max(row?.updated_at ?? 0, snap?.updated_at ?? 0, layer?.updated_at ?? 0);
    const refs: RowRef[] = [...(row ? [{ table: "devices", key: name } as RowRef] : []), ...(snap ? [{ table: "snapshots", key: snap.id } as RowRef] : [])];
    let v: Verdict | null = null;
    if (snap && snap.thin_id === thinId) v = snapVerdict(snap);
    else if (layer && layer.thin_id === thinId) {
      v = layerVerdict(layer);
      // a committed layer's device is deactivated before commit: an active one is a leftover
      if (v.live && layer.state === "committed")
        v = { live: false, reason: "db_orphaned", detail: `${layerDesc(layer)} is committed; its device should be inactive`, since };
    }
    if (v?.live) {
      // whatever its device row says: only a release makes a handed-out snapshot's device optional
      devices.set(name, {
        name,
        thinId,
        status: "live",
        detail: v.detail,
        since,
        mustExist: !!snap && snap.state === "active",
        snapshotId: snap?.id ?? null,
        refs,
      });
    } else if (row?.state === "removed" && !v) {
      devices.set(name, { name, thinId, status: "removed", detail: "device row: removed", since, mustExist: false, refs });
    } else {
      devices.set(name, {
        name,
        thinId,
        status: row?.state === "removed" ? "removed" : "dead",
        reason: v && !v.live ? v.reason : row?.state === "leaked" ? "db_failed" : "owner_missing",
        detail: v && !v.live ? v.detail : `device row: ${row?.state ?? "?"}${row?.reason ? ` (${row.reason})` : ""}; no owner row holds it`,
        since,
        mustExist: false,
        refs,
        locked: v && !v.live ? (v.locked ?? null) : null,
      });
    }
  }

  const mounts: DbMount[] = rows.mounts.map((m) => ({ path: m.path, deviceName: m.device_name, state: m.state, since: m.updated_at }));

  for (const l of rows.layers) {
    if (l.state !== "building" || l.thin_id === null || builder(l).alive) continue;
    notes.push(
      `${layerDesc(l)} is an interrupted build (phase ${l.phase}, thin id ${l.thin_id}): collected as interrupted_build once older than the grace period; a re-run of the unpack then starts it afresh`,
    );
  }

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
