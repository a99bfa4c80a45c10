// GC's shared vocabulary: what the scans see, what the DB says, and what the plan decides. The plan
// (plan.ts) is a pure function of these, so every decision is unit-testable without a kernel.

/** An active dm device as seen by `dmsetup info` + `dmsetup table`. */
export interface DmDevice {
  name: string;
  major: number;
  minor: number;
  open: number;
  suspended: boolean;
  /** An inactive table is loaded (a reload is waiting for resume). */
  inactiveTable: boolean;
  /** Raw live table (all lines); null when the device has no live table. */
  table: string | null;
  /** Thin id when the table is a single thin target; with the pool it maps (major:minor). */
  thin: { poolMajorMinor: string; thinId: number; sectors: number } | null;
}

/** Why a device is not ours. Listed, never touched. */
export type ForeignWhy =
  | "no_prefix_on_pool" // a thin device on OUR pool without our name prefix
  | "prefix_other_target"; // our prefix but not a thin target on this pool

export interface ForeignDevice {
  name: string;
  thinId: number | null;
  why: ForeignWhy;
  detail: string;
}

export interface DmScan {
  pool: { name: string; major: number; minor: number; table?: string | null };
  /** Devices named `<prefix>-<pool>-…` whose table is a thin target on this pool, or no table at all. */
  ours: DmDevice[];
  foreign: ForeignDevice[];
  /** Devices that have nothing to do with this pool (other pools, LVM, crypt…): counted only. */
  unrelated: number;
}

export interface MetaScan {
  /** "ok": ids read from a metadata snapshot; "skipped": see `skipped`. */
  status: "ok" | "skipped";
  method: "thin_ls" | "thin_dump" | null;
  /** Thin id → mapped pool blocks (null when the method does not report it). */
  ids: Map<number, number | null>;
  /** Bytes per pool block (to report mapped bytes). */
  blockBytes: number;
  /** The pool's transaction id when the metadata was read (null: not read). */
  transactionId?: number | null;
  /** performance.now() when the status the scan went on (ok, rw, no needs_check) was read. */
  statusAt?: number;
  /** A metadata snapshot was already held when we looked (a previous run died holding it?). */
  staleHold: { heldRoot: number; released: boolean } | null;
  skipped: { reason: "stale_metadata_snap" | "metadata_snap_busy" | "pool_not_rw" | "scan_failed" | "unhealthy"; detail: string } | null;
  metaDev: string | null;
}

export interface MountRef {
  mountPoint: string;
  majorMinor: string;
  source: string;
  /** Under thinimg's own mount dir (or recorded by the DB): GC may unmount it. */
  ours: boolean;
}

// ----- the DB's view (built from lib/store by db-view.ts; fixtures in unit tests) -----

/** Orphan reasons known from the DB rows. */
export type DbDeadReason =
  | "db_failed" // owner failed (layer build, activation)
  | "db_released" // snapshot released by the user
  | "db_orphaned" // ledger: abandoned attempt, pre-existing id, …
  | "db_deleting" // a previous GC sent the delete but did not confirm it
  | "db_deleted" // ledger says confirmed deleted, yet the pool still has it
  | "owner_missing" // the ledger names an owner row that no longer exists (row deleted by hand)
  | "interrupted_build" // a layer build whose builder died (kill -9, OOM, reboot), older than the grace period
  | "unreferenced_layer"; // a committed layer an image removal released, referenced by nothing since (unreferenced.ts)

export type OrphanReason = DbDeadReason | "not_in_db" | "device_not_held" | "no_table";

/** A DB row GC may have to repair when what it describes is gone from the pool. */
export interface RowRef {
  table: "layers" | "images" | "snapshots" | "thin_ids" | "devices" | "mounts";
  key: string | number;
}

export interface DbThin {
  thinId: number;
  /** live: never collected. dead: garbage the DB knows about. deleted: ledger says confirmed gone. */
  status: "live" | "dead" | "deleted";
  reason?: DbDeadReason;
  /** Human description of the owner and its state ("snapshot 12 of image web: released"). */
  detail: string;
  /** Unix ms of the last state change; the grace period counts from here. */
  since: number;
  /** Live and confirmed in the pool (committed layer, active snapshot): absence means the DB needs repair. */
  mustExist: boolean;
  /** Rows to repair when mustExist and the id is gone. */
  refs: RowRef[];
  /** A live process holds a named lock that may resume this (an unpack re-run): left alone. */
  locked?: string | null;
}

export interface DbDevice {
  name: string;
  thinId: number;
  status: "live" | "dead" | "removed";
  reason?: DbDeadReason;
  detail: string;
  since: number;
  /** The DB says it is active (snapshot handed to a user): absence means it is detached. */
  mustExist: boolean;
  /** The snapshot that owns it, when one does. */
  snapshotId?: number | null;
  refs: RowRef[];
  locked?: string | null;
}

export interface DbMount {
  path: string;
  deviceName: string;
  state: "mounting" | "mounted" | "unmounting" | "unmounted" | "leaked";
  since: number;
}

export interface DbView {
  pool: string;
  /** The ledger has at least one row for this pool (false: wrong --state-dir or a fresh DB). */
  known: boolean;
  thins: Map<number, DbThin>;
  devices: Map<string, DbDevice>;
  mounts: DbMount[];
  /** Thin id → when GC first saw it in the pool with no DB record (GC's side table). */
  firstSeen?: Map<number, number>;
  /** Highest pool transaction id the DB recorded (null: none). */
  lastTxn?: number | null;
}

// ----- the plan -----

export type SkipReason =
  | "mounted" // mounted somewhere that is not thinimg's own mount dir
  | "open" // open count > 0 (a VM, a process, a holder device)
  | "suspended"
  | "reload_pending" // an inactive table is loaded
  | "too_young" // younger than the grace period: may be work in flight
  | "foreign" // an id or device used by something that is not ours
  | "device_skipped" // the thin id's device was skipped, so the id is kept too
  | "db_unknown" // the DB knows nothing about this pool, or is behind it: refusing to call unknown ids orphans
  | "locked" // a live process holds the layer's or an image's named lock: an unpack may resume it
  | "busy"; // act time: the kernel said busy; next run

export const NEEDS_HUMAN: Record<SkipReason, boolean> = {
  mounted: true,
  open: true,
  suspended: true,
  reload_pending: true,
  too_young: false,
  foreign: false,
  device_skipped: false,
  db_unknown: true,
  locked: false,
  busy: false,
};

export interface Orphan {
  /** Thin id to delete from the pool (null: device-only action). */
  thinId: number | null;
  /** Active dm device to remove first (null: inactive leak). */
  device: string | null;
  /** Our own mounts of the device, unmounted first. */
  unmount: string[];
  /** Delete the thin id after the device is gone (false: the id is live, only the device leaked). */
  deleteThin: boolean;
  reason: OrphanReason;
  detail: string;
  ageMs: number | null;
  mappedBytes: number | null;
  /** Fingerprint of the DB rows the verdict was made from (compare-and-set at act time; run.ts). */
  witness?: string;
}

export interface Skip {
  thinId: number | null;
  device: string | null;
  reason: SkipReason;
  detail: string;
  /** What it would be collected for once the skip no longer applies. */
  orphanReason: OrphanReason;
}

export type RepairKind =
  | "thin_gone" // the DB holds a thin id live that the pool does not have
  | "thin_already_deleted" // the DB has a dead id (to delete) that the pool no longer has: confirmed
  | "device_row_gone" // a dead device row (leaked, failed…) whose device no longer exists
  | "mount_gone"; // the DB says mounted; mountinfo disagrees

export interface Repair {
  kind: RepairKind;
  thinId: number | null;
  device: string | null;
  path: string | null;
  detail: string;
  refs: RowRef[];
  /** Fingerprint of `refs` as the plan saw them: the repair is applied only if they are unchanged. */
  witness?: string;
}

/** A snapshot handed to a user (active, never released) whose device is not loaded: after a reboot,
 * or removed by hand. Its data is never collected; it is re-attached, or released by its user. */
export interface Detached {
  snapshotId: number | null;
  thinId: number;
  device: string;
  detail: string;
}

export interface Plan {
  pool: string;
  actions: Orphan[];
  skips: Skip[];
  repairs: Repair[];
  detached: Detached[];
  foreign: ForeignDevice[];
  /** Things a human should know that are not per-orphan (stale metadata hold, empty DB, …). */
  notes: string[];
}
