// GC decision logic with fixtures: every orphan kind, every skip reason, repairs, and the rule that
// foreign devices (and the thin ids they map) never end up in the action list.
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildDbView } from "../../lib/gc/db-view.ts";
import type { DbDevice, DbThin, DbView, DmDevice, DmScan, ForeignDevice, MetaScan, MountRef, Orphan, Plan } from "../../lib/gc/model.ts";
import { makePlan, type PlanInput } from "../../lib/gc/plan.ts";
import { currentHolder } from "../../lib/lock/owner.ts";
import { type Db, openDb } from "../../lib/store/db.ts";
import { readGcRows } from "../../lib/store/gc-queries.ts";
import { updateLayer } from "../../lib/store/layers.ts";
import { removeImageRecord } from "../../lib/store/lifecycle.ts";
import { putLockRow } from "../../lib/store/locks.ts";
import { insertSnapshot } from "../../lib/store/snapshots.ts";
import { makeImage, makeLayer } from "../helpers/store.ts";

const POOL = "tp";
const NOW = 1_700_000_000_000;
const MIN = 60_000;
const OLD = NOW - 60 * MIN;
const GRACE = 10 * MIN;
const SCANNED = NOW - 1000;

const dev = (thinId: number | null, o: Partial<DmDevice> & { name?: string } = {}): DmDevice => ({
  name: o.name ?? `thinimg-${POOL}-snap-${thinId}`,
  major: 254,
  minor: 10 + (thinId ?? 99),
  open: 0,
  suspended: false,
  inactiveTable: false,
  table: thinId === null ? null : `0 2097152 thin 254:0 ${thinId}`,
  thin: thinId === null ? null : { poolMajorMinor: "254:0", thinId, sectors: 2097152 },
  ...o,
});

const thin = (thinId: number, status: DbThin["status"], o: Partial<DbThin> = {}): DbThin => ({
  thinId,
  status,
  detail: `${status} row for ${thinId}`,
  since: OLD,
  mustExist: status === "live",
  refs: [{ table: "thin_ids", key: thinId }],
  ...(status === "dead" ? { reason: "db_orphaned" as const } : {}),
  ...o,
});

const dbdev = (name: string, thinId: number, status: DbDevice["status"], o: Partial<DbDevice> = {}): DbDevice => ({
  name,
  thinId,
  status,
  detail: `device ${name} ${status}`,
  since: OLD,
  mustExist: false,
  refs: [{ table: "devices", key: name }],
  ...o,
});

interface Fx {
  ours?: DmDevice[];
  foreign?: ForeignDevice[];
  ids?: number[];
  meta?: Partial<MetaScan>;
  thins?: DbThin[];
  devices?: DbDevice[];
  mounts?: [string, MountRef[]][];
  mountPoints?: string[];
  known?: boolean;
  dbMounts?: DbView["mounts"];
  grace?: number;
  /** thin id → first seen by GC (default: every id, an hour ago — an earlier --force run saw them) */
  firstSeen?: [number, number][];
  lastTxn?: number | null;
}

function plan(f: Fx): Plan {
  const dm: DmScan = { pool: { name: POOL, major: 254, minor: 0 }, ours: f.ours ?? [], foreign: f.foreign ?? [], unrelated: 0 };
  const meta: MetaScan = {
    status: "ok",
    method: "thin_ls",
    ids: new Map((f.ids ?? []).map((i) => [i, 16])),
    blockBytes: 65536,
    staleHold: null,
    skipped: null,
    metaDev: "/dev/loop0",
    ...f.meta,
  };
  const db: DbView = {
    pool: POOL,
    known: f.known ?? true,
    thins: new Map((f.thins ?? []).map((t) => [t.thinId, t])),
    devices: new Map((f.devices ?? []).map((d) => [d.name, d])),
    mounts: f.dbMounts ?? [],
    firstSeen: new Map(
      f.firstSeen ?? [...(f.ids ?? []), ...(f.ours ?? []).flatMap((d) => (d.thin ? [d.thin.thinId] : []))].map((i): [number, number] => [i, OLD]),
    ),
    lastTxn: f.lastTxn ?? null,
  };
  const inp: PlanInput = {
    dm,
    meta,
    mounts: new Map(f.mounts ?? []),
    mountPoints: new Set(f.mountPoints ?? []),
    db,
    now: NOW,
    graceMs: f.grace ?? GRACE,
    scannedAt: SCANNED,
  };
  return makePlan(inp);
}

const brief = (a: Orphan) => ({ thinId: a.thinId, device: a.device, deleteThin: a.deleteThin, reason: a.reason, unmount: a.unmount });

describe("orphan kinds", () => {
  test("inactive thin id unknown to the DB (made by hand with dmsetup message)", () => {
    const p = plan({ ids: [1, 7], thins: [thin(1, "live")] });
    expect(p.actions.map(brief)).toEqual([{ thinId: 7, device: null, deleteThin: true, reason: "not_in_db", unmount: [] }]);
    expect(p.actions[0]!.mappedBytes).toBe(16 * 65536);
    expect(p.actions[0]!.ageMs).toBe(NOW - OLD); // counted from when GC first saw it
    expect(p.skips).toEqual([]);
  });

  test("an unknown id is not deleted the first time GC sees it: it waits out the grace period from then", () => {
    const first = plan({ ids: [7], thins: [thin(1, "live")], firstSeen: [] });
    expect(first.actions).toEqual([]);
    expect(first.skips.map((x) => [x.thinId, x.reason, x.orphanReason])).toEqual([[7, "too_young", "not_in_db"]]);
    expect(first.skips[0]!.detail).toContain("first seen in the pool now");
    // the same for an unrecorded device of ours
    const d = dev(8);
    expect(plan({ ours: [d], ids: [8], thins: [thin(1, "live")], firstSeen: [] }).skips.map((x) => x.reason)).toEqual(["too_young"]);
    // seen 5 minutes ago: still waiting; an hour ago: collected; --grace 0: at once
    expect(plan({ ids: [7], thins: [thin(1, "live")], firstSeen: [[7, NOW - 5 * MIN]] }).skips[0]!.detail).toContain("first seen in the pool 5m ago");
    expect(plan({ ids: [7], thins: [thin(1, "live")], firstSeen: [[7, OLD]] }).actions.map((a) => a.thinId)).toEqual([7]);
    expect(plan({ ids: [7], thins: [thin(1, "live")], firstSeen: [], grace: 0 }).actions.map((a) => a.thinId)).toEqual([7]);
  });

  test("DB behind the pool (pool transaction id ahead of the DB's last recorded): unknown ids need a human", () => {
    const p = plan({ ids: [3, 7], thins: [thin(1, "live"), thin(3, "dead", { reason: "db_released" })], meta: { transactionId: 9 }, lastTxn: 4 });
    expect(p.actions.map((a) => a.thinId)).toEqual([3]); // what the DB knows is dead is still collected
    expect(p.skips.map((x) => [x.thinId, x.reason])).toEqual([[7, "db_unknown"]]);
    expect(p.skips[0]!.detail).toContain("DB behind");
    expect(p.notes.join(" ")).toContain("DB is behind the pool");
    // caught up: collected
    expect(plan({ ids: [7], thins: [thin(1, "live")], meta: { transactionId: 9 }, lastTxn: 9 }).actions.map((a) => a.thinId)).toEqual([7]);
  });

  test("locked: a failed layer an unpack may resume is left alone; a live row's repair is not made either", () => {
    const p = plan({
      ids: [5],
      thins: [
        thin(5, "dead", { reason: "db_failed", locked: "layer:tp:x held by pid 7" }),
        thin(6, "dead", { reason: "interrupted_build", locked: "image:tp:web held by pid 7" }),
      ],
    });
    expect(p.actions).toEqual([]);
    expect(p.skips.map((x) => [x.thinId, x.reason])).toEqual([[5, "locked"]]);
    expect(p.skips[0]!.detail).toContain("held by pid 7");
    expect(p.repairs).toEqual([]); // 6 is not in the pool, but its owner may be resuming it
  });

  test("every DB-dead reason is carried through for inactive ids", () => {
    const reasons = ["db_failed", "db_released", "db_orphaned", "db_deleting", "owner_missing"] as const;
    const p = plan({
      ids: [10, 11, 12, 13, 14, 15],
      thins: [...reasons.map((r, i) => thin(10 + i, "dead", { reason: r })), thin(15, "deleted", { reason: "db_deleted" })],
    });
    expect(p.actions.map((a) => [a.thinId, a.reason])).toEqual([
      [10, "db_failed"],
      [11, "db_released"],
      [12, "db_orphaned"],
      [13, "db_deleting"],
      [14, "owner_missing"],
      [15, "db_deleted"],
    ]);
    expect(p.actions.every((a) => a.deleteThin && a.device === null)).toBe(true);
  });

  test("active device of a dead id: remove the device, then delete the id", () => {
    const d = dev(5);
    const p = plan({ ours: [d], ids: [5], thins: [thin(5, "dead", { reason: "db_failed" })], devices: [dbdev(d.name, 5, "dead", { reason: "db_failed" })] });
    expect(p.actions.map(brief)).toEqual([{ thinId: 5, device: d.name, deleteThin: true, reason: "db_failed", unmount: [] }]);
  });

  test("active device nobody recorded (DB row deleted by hand) is an orphan with its id", () => {
    const d = dev(8);
    const p = plan({ ours: [d], ids: [8], thins: [thin(1, "live")] });
    expect(p.actions.map(brief)).toEqual([{ thinId: 8, device: d.name, deleteThin: true, reason: "not_in_db", unmount: [] }]);
  });

  test("device of a live id that the DB does not hold: only the device goes", () => {
    const d = dev(3, { name: `thinimg-${POOL}-layer-3` });
    const p = plan({
      ours: [d],
      ids: [3],
      thins: [thin(3, "live")],
      devices: [dbdev(d.name, 3, "dead", { reason: "db_orphaned", detail: "committed layer's device should be inactive" })],
    });
    expect(p.actions.map(brief)).toEqual([{ thinId: 3, device: d.name, deleteThin: false, reason: "device_not_held", unmount: [] }]);
    expect(p.actions[0]!.mappedBytes).toBeNull();
  });

  test("device without a table: removed, no thin id touched", () => {
    const d = dev(null, { name: `thinimg-${POOL}-snap-9` });
    const p = plan({ ours: [d], ids: [9], thins: [thin(9, "live")] });
    expect(p.actions.map(brief)).toEqual([{ thinId: null, device: d.name, deleteThin: false, reason: "no_table", unmount: [] }]);
  });

  test("our own leaked mount (under the mount dir) is unmounted first", () => {
    const d = dev(6, { open: 1 });
    const m: MountRef = { mountPoint: "/var/lib/thinimg/mnt/x", majorMinor: "254:16", source: `/dev/mapper/${d.name}`, ours: true };
    const p = plan({ ours: [d], ids: [6], thins: [thin(6, "dead", { reason: "db_failed" })], mounts: [[d.name, [m]]] });
    expect(p.actions.map(brief)).toEqual([{ thinId: 6, device: d.name, deleteThin: true, reason: "db_failed", unmount: ["/var/lib/thinimg/mnt/x"] }]);
  });

  test("live things produce nothing: held devices, live ids", () => {
    const d = dev(2);
    const p = plan({ ours: [d], ids: [1, 2], thins: [thin(1, "live"), thin(2, "live")], devices: [dbdev(d.name, 2, "live")] });
    expect(p.actions).toEqual([]);
    expect(p.skips).toEqual([]);
    expect(p.repairs).toEqual([]);
  });

  test("a DB device row naming another thin id does not hold this device", () => {
    const d = dev(4);
    const p = plan({ ours: [d], ids: [4], thins: [thin(4, "dead")], devices: [dbdev(d.name, 99, "live")] });
    expect(p.actions.map((a) => [a.thinId, a.device, a.deleteThin])).toEqual([[4, d.name, true]]);
  });

  test("two devices on one orphan id: both removed, one delete, after them", () => {
    const a = dev(5, { name: `thinimg-${POOL}-snap-5`, minor: 20 });
    const b = dev(5, { name: `thinimg-${POOL}-snap-5b`, minor: 21 });
    const p = plan({ ours: [a, b], ids: [5], thins: [thin(5, "dead")] });
    expect(p.actions.map((x) => [x.device, x.deleteThin])).toEqual([
      [a.name, false],
      [b.name, true],
    ]);
  });

  test("order: devices first, then inactive ids, ascending", () => {
    const p = plan({ ours: [dev(30), dev(20)], ids: [20, 30, 3, 1], thins: [] });
    expect(p.actions.map((a) => [a.device !== null, a.thinId])).toEqual([
      [true, 20],
      [true, 30],
      [false, 1],
      [false, 3],
    ]);
  });
});

describe("skip reasons", () => {
  test("too_young: within the grace period (DB time), even if unknown devices are old", () => {
    const p = plan({ ids: [5], thins: [thin(5, "dead", { since: NOW - 2 * MIN })] });
    expect(p.actions).toEqual([]);
    expect(p.skips.map((s) => [s.thinId, s.reason, s.orphanReason])).toEqual([[5, "too_young", "db_orphaned"]]);
    expect(plan({ ids: [5], thins: [thin(5, "dead", { since: NOW - 2 * MIN })], grace: 0 }).actions.length).toBe(1);
  });

  test("too_young uses the newer of the device row and the ledger", () => {
    const d = dev(5);
    const p = plan({ ours: [d], ids: [5], thins: [thin(5, "dead")], devices: [dbdev(d.name, 5, "dead", { since: NOW - MIN, reason: "db_failed" })] });
    expect(p.skips.map((s) => s.reason)).toEqual(["too_young"]);
  });

  test("mounted outside our mount dir", () => {
    const d = dev(6, { open: 1 });
    const m: MountRef = { mountPoint: "/srv/vm1", majorMinor: "254:16", source: `/dev/mapper/${d.name}`, ours: false };
    const p = plan({ ours: [d], ids: [6], thins: [thin(6, "dead")], mounts: [[d.name, [m]]] });
    expect(p.actions).toEqual([]);
    expect(p.skips.map((s) => [s.device, s.reason])).toEqual([[d.name, "mounted"]]);
    expect(p.skips[0]!.detail).toContain("/srv/vm1");
  });

  test("mounted both by us and by someone else: skipped (we never unmount theirs)", () => {
    const d = dev(6, { open: 1 });
    const ours: MountRef = { mountPoint: "/var/lib/thinimg/mnt/x", majorMinor: "254:16", source: "", ours: true };
    const theirs: MountRef = { mountPoint: "/mnt/bind", majorMinor: "254:16", source: "", ours: false };
    const p = plan({ ours: [d], ids: [6], thins: [thin(6, "dead")], mounts: [[d.name, [ours, theirs]]] });
    expect(p.actions).toEqual([]);
    expect(p.skips[0]!.reason).toBe("mounted");
  });

  test("open (a VM holds it)", () => {
    const d = dev(7, { open: 1 });
    const p = plan({ ours: [d], ids: [7], thins: [thin(7, "dead", { reason: "db_released" })] });
    expect(p.skips.map((s) => [s.device, s.reason, s.orphanReason])).toEqual([[d.name, "open", "db_released"]]);
    expect(p.actions).toEqual([]);
  });

  test("open beyond our own mount's one opener", () => {
    const d = dev(7, { open: 2 });
    const m: MountRef = { mountPoint: "/var/lib/thinimg/mnt/x", majorMinor: "254:17", source: "", ours: true };
    const p = plan({ ours: [d], ids: [7], thins: [thin(7, "dead")], mounts: [[d.name, [m]]] });
    expect(p.skips.map((s) => s.reason)).toEqual(["open"]);
  });

  test("suspended and reload_pending", () => {
    const s = dev(8, { suspended: true });
    const r = dev(9, { inactiveTable: true });
    const p = plan({ ours: [s, r], ids: [8, 9], thins: [] });
    expect(p.skips.map((x) => [x.device, x.reason])).toEqual([
      [s.name, "suspended"],
      [r.name, "reload_pending"],
    ]);
    expect(p.actions).toEqual([]);
  });

  test("a thin id whose device is skipped is kept (device_skipped), never deleted under it", () => {
    const a = dev(5, { name: `thinimg-${POOL}-snap-5`, open: 1 });
    const b = dev(5, { name: `thinimg-${POOL}-snap-5b`, minor: 40 });
    const p = plan({ ours: [a, b], ids: [5], thins: [thin(5, "dead")] });
    expect(p.actions).toEqual([]);
    expect(p.skips.map((s) => [s.device, s.reason])).toEqual([
      [a.name, "open"],
      [b.name, "device_skipped"],
    ]);
  });

  test("db_unknown: an empty DB (wrong --state-dir?) never turns the pool into orphans", () => {
    const p = plan({ ours: [dev(1)], ids: [1, 2, 3], thins: [], known: false });
    expect(p.actions).toEqual([]);
    expect(p.skips.map((s) => s.reason)).toEqual(["db_unknown", "db_unknown", "db_unknown"]);
    expect(p.notes.join(" ")).toContain("no thin ids recorded");
  });
});

describe("foreign devices are never actions", () => {
  const foreign: ForeignDevice[] = [
    { name: "vm-disk", thinId: 4, why: "no_prefix_on_pool", detail: "thin id 4 on this pool" },
    { name: `thinimg-${POOL}-weird`, thinId: null, why: "prefix_other_target", detail: "linear" },
  ];

  test("listed, and the thin id a foreign device maps is skipped as foreign", () => {
    const p = plan({ foreign, ids: [4, 5], thins: [] });
    expect(p.foreign).toEqual(foreign);
    expect(p.actions.map((a) => a.thinId)).toEqual([5]);
    expect(p.skips.map((s) => [s.thinId, s.reason])).toEqual([[4, "foreign"]]);
    const names = new Set(foreign.map((f) => f.name));
    expect(p.actions.some((a) => a.device !== null && names.has(a.device))).toBe(false);
  });

  test("even when the DB calls that id dead", () => {
    const p = plan({ foreign, ids: [4], thins: [thin(4, "dead", { reason: "db_released" })] });
    expect(p.actions).toEqual([]);
    expect(p.skips[0]!.reason).toBe("foreign");
  });

  test("our orphan device sharing an id with a foreign device: device removed, id kept", () => {
    const d = dev(4);
    const p = plan({ foreign, ours: [d], ids: [4], thins: [thin(4, "dead")] });
    expect(p.actions.map(brief)).toEqual([{ thinId: 4, device: d.name, deleteThin: false, reason: "db_orphaned", unmount: [] }]);
    expect(p.skips.map((s) => [s.thinId, s.device, s.reason])).toEqual([[4, null, "foreign"]]);
  });
});

describe("metadata scan skipped", () => {
  test("stale hold: inactive ids are not guessed, device orphans still found, a note says why", () => {
    const d = dev(5);
    const p = plan({
      ours: [d],
      ids: [],
      meta: { status: "skipped", skipped: { reason: "stale_metadata_snap", detail: "held root 23" }, staleHold: { heldRoot: 23, released: false } },
      thins: [thin(5, "dead"), thin(6, "live")],
    });
    expect(p.actions.map((a) => [a.thinId, a.device, a.deleteThin])).toEqual([[5, d.name, true]]);
    expect(p.repairs).toEqual([]); // absence proves nothing without the scan
    expect(p.notes.join(" ")).toContain("held root 23");
  });
});

describe("repairs", () => {
  test("pool recreated: live ids gone → thin_gone for each, with a note", () => {
    const refs = [
      { table: "layers" as const, key: 1 },
      { table: "thin_ids" as const, key: 1 },
    ];
    const p = plan({ ids: [], thins: [thin(1, "live", { refs }), thin(2, "live")] });
    expect(p.repairs.map((r) => [r.kind, r.thinId])).toEqual([
      ["thin_gone", 1],
      ["thin_gone", 2],
    ]);
    expect(p.repairs[0]!.refs).toEqual(refs);
    expect(p.notes.join(" ")).toContain("recreated");
  });

  test("rows changed after the scan began are never repaired (work that started after our snapshot)", () => {
    const p = plan({ ids: [], thins: [thin(1, "live", { since: SCANNED + 10 })] });
    expect(p.repairs).toEqual([]);
  });

  test("live but not mustExist (building, pending) is never 'gone'", () => {
    const p = plan({ ids: [], thins: [thin(1, "live", { mustExist: false })] });
    expect(p.repairs).toEqual([]);
  });

  test("an id the pool shows only through an active device is not gone", () => {
    const d = dev(1);
    const p = plan({ ours: [d], ids: [], thins: [thin(1, "live")], devices: [dbdev(d.name, 1, "live")] });
    expect(p.repairs).toEqual([]);
  });

  test("dead ids already absent: ledger confirmed deleted", () => {
    const p = plan({ ids: [], thins: [thin(3, "dead", { reason: "db_deleting" })] });
    expect(p.repairs.map((r) => [r.kind, r.thinId])).toEqual([["thin_already_deleted", 3]]);
    expect(p.actions).toEqual([]);
  });

  test("active snapshot whose device vanished (a reboot): detached — kept, listed for re-attach, no repair", () => {
    const snapDev = dbdev("thinimg-tp-snap-4", 4, "live", { mustExist: true, snapshotId: 12 });
    for (const grace of [0, GRACE]) {
      const p = plan({ ids: [4], thins: [thin(4, "live")], devices: [snapDev], grace });
      expect(p.detached).toEqual([
        { snapshotId: 12, thinId: 4, device: "thinimg-tp-snap-4", detail: expect.stringContaining("bun scripts/activate.ts --snapshot 12") },
      ]);
      expect(p.repairs).toEqual([]);
      expect(p.actions).toEqual([]);
      expect(p.skips).toEqual([]);
    }
  });

  test("detached is listed even when the pool metadata could not be read", () => {
    const p = plan({
      ids: [],
      meta: { status: "skipped", skipped: { reason: "metadata_snap_busy", detail: "busy" } },
      thins: [thin(4, "live")],
      devices: [dbdev("thinimg-tp-snap-4", 4, "live", { mustExist: true, snapshotId: 3 })],
    });
    expect(p.detached.map((d) => d.snapshotId)).toEqual([3]);
    expect(p.repairs).toEqual([]);
  });

  test("an attached active snapshot is neither detached nor an orphan", () => {
    const d = dev(4);
    const p = plan({ ours: [d], ids: [4], thins: [thin(4, "live")], devices: [dbdev(d.name, 4, "live", { mustExist: true, snapshotId: 1 })] });
    expect(p.detached).toEqual([]);
    expect(p.actions).toEqual([]);
  });

  test("a detached snapshot whose thin id is gone from the pool is lost (thin_gone), not detached", () => {
    const p = plan({ ids: [], thins: [thin(4, "live")], devices: [dbdev("thinimg-tp-snap-4", 4, "live", { mustExist: true, snapshotId: 12 })] });
    expect(p.detached).toEqual([]);
    expect(p.repairs.map((r) => r.kind)).toEqual(["thin_gone"]);
  });

  test("a released snapshot whose device is gone: its thin id is collected", () => {
    const p = plan({ ids: [4], thins: [thin(4, "dead", { reason: "db_released" })], devices: [dbdev("thinimg-tp-snap-4", 4, "removed")] });
    expect(p.detached).toEqual([]);
    expect(p.actions.map((a) => [a.thinId, a.reason, a.deleteThin])).toEqual([[4, "db_released", true]]);
  });

  test("a dead device row whose device is gone: device_row_gone (only the row; a live or present one is left)", () => {
    const gone = dbdev("thinimg-tp-layer-6", 6, "dead", {
      reason: "db_failed",
      refs: [
        { table: "devices", key: "thinimg-tp-layer-6" },
        { table: "snapshots", key: 9 },
      ],
    });
    const present = dev(7, { name: "thinimg-tp-layer-7" });
    const p = plan({
      ours: [present],
      ids: [6, 7],
      thins: [thin(6, "dead", { reason: "db_failed" }), thin(7, "dead", { reason: "db_failed" })],
      devices: [gone, dbdev(present.name, 7, "dead", { reason: "db_failed" }), dbdev("thinimg-tp-layer-8", 8, "removed")],
    });
    expect(p.repairs.map((r) => [r.kind, r.device, r.refs])).toEqual([
      ["device_row_gone", "thinimg-tp-layer-6", [{ table: "devices", key: "thinimg-tp-layer-6" }]],
    ]);
  });

  test("mount rows that are no longer mounted", () => {
    const p = plan({
      dbMounts: [
        { path: "/s/mnt/a", deviceName: "x", state: "leaked", since: OLD },
        { path: "/s/mnt/b", deviceName: "y", state: "mounted", since: OLD },
        { path: "/s/mnt/c", deviceName: "z", state: "unmounted", since: OLD },
      ],
      mountPoints: ["/s/mnt/b"],
    });
    expect(p.repairs.map((r) => [r.kind, r.path])).toEqual([["mount_gone", "/s/mnt/a"]]);
  });
});

// Layers released by an image removal, from real store rows through buildDbView into makePlan (both
// pure over what they are given): what the removal frees, and everything that keeps a layer.
describe("unreferenced layers (image removal)", () => {
  let dir: string;
  let db: Db;
  const alive = (pid: number) => pid === process.pid;
  const T = Date.now();

  const layer = (chain: string, parent: { id: number } | null, committed = true) => makeLayer(db, POOL, chain, parent, committed);
  const image = (name: string, layers: { id: number }[]) => makeImage(db, POOL, name, layers);
  /** Every ledger id is in the pool, inactive; `at` is the plan's clock. */
  function planNow(at = T + 60 * MIN, grace = GRACE): Plan {
    const rows = readGcRows(db, POOL);
    const { view } = buildDbView(POOL, rows, alive);
    const ids = new Map(rows.thinIds.map((t): [number, number] => [t.thin_id, 16]));
    return makePlan({
      dm: { pool: { name: POOL, major: 254, minor: 0 }, ours: [], foreign: [], unrelated: 0 },
      meta: { status: "ok", method: "thin_ls", ids, blockBytes: 65536, transactionId: null, staleHold: null, skipped: null, metaDev: "/dev/loop0" },
      mounts: new Map(),
      mountPoints: new Set(),
      db: view,
      now: at,
      graceMs: grace,
      scannedAt: at,
    });
  }
  const collected = (p: Plan) => p.actions.filter((a) => a.reason === "unreferenced_layer").map((a) => a.thinId);

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "thinimg-gc-unref-"));
    db = openDb(join(dir, "state.db"));
  });
  afterEach(() => {
    db.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test("two images sharing a base: removing one collects only its own layers; removing both, all", () => {
    const base = layer("base", null);
    const mid = layer("mid", base);
    const a = layer("a-top", mid);
    const b = layer("b-top", mid);
    const ia = image("web:1", [base, mid, a]);
    const ib = image("web:2", [base, mid, b]);
    expect(planNow().actions).toEqual([]); // nothing is garbage while both are there
    const rec = removeImageRecord(db, ia, "test");
    expect([rec.released, rec.shared]).toEqual([[a.id], [base.id, mid.id]]);
    const p = planNow();
    expect(p.actions.map((x) => [x.thinId, x.reason, x.deleteThin, x.device])).toEqual([[a.thinId, "unreferenced_layer", true, null]]);
    expect(p.actions[0]!.detail).toContain(`layer ${a.id}: no image references it`);
    expect(p.actions[0]!.mappedBytes).toBe(16 * 65536);
    removeImageRecord(db, ib, "test");
    expect(collected(planNow()).sort()).toEqual([base.thinId, mid.thinId, a.thinId, b.thinId].sort());
  });

  test("a repeat removal changes nothing; a layer referenced again (re-unpacked) is no longer collectable", () => {
    const base = layer("base", null);
    const ia = image("app", [base]);
    removeImageRecord(db, ia, "test");
    expect(removeImageRecord(db, ia, "again")).toEqual({ already: true, released: [], shared: [] });
    expect(collected(planNow())).toEqual([base.thinId]);
    image("app", [base]); // the same name unpacked again reuses the committed layer
    expect(planNow().actions).toEqual([]);
  });

  test("layers of an unpack that failed half-way are never released (its re-run reuses them)", () => {
    layer("lonely", null); // committed, no image ever referenced it
    expect(planNow().actions).toEqual([]);
  });

  test("a released parent of a kept or building layer stays (chains)", () => {
    const base = layer("base", null);
    const top = layer("top", base);
    const ia = image("old", [base, top]);
    removeImageRecord(db, ia, "test");
    // an unpack builds on top of `top` (its builder is gone, but the attempt may resume): both stay
    const child = layer("child", top, false);
    expect(collected(planNow())).toEqual([]);
    // once that attempt starts afresh (phase new, no thin id) nothing depends on them
    updateLayer(db, child.id, { thin_id: null, phase: "new" });
    expect(collected(planNow()).sort()).toEqual([base.thinId, top.thinId].sort());
  });

  test("an activation in flight (pending snapshot) keeps the layer; an active snapshot does not", () => {
    const base = layer("base", null);
    const ia = image("img", [base]);
    const s = insertSnapshot(db, { pool: POOL, imageId: ia, layerId: base.id, virtualSize: 1 << 30, pid: process.pid, command: "activate" });
    removeImageRecord(db, ia, "test");
    expect(collected(planNow())).toEqual([]);
    db.query("UPDATE snapshots SET state = 'active' WHERE id = ?").run(s.id);
    expect(collected(planNow())).toEqual([base.thinId]);
  });

  test("a live image lock (an unpack in progress may reuse it) skips it as locked; grace counts from the removal", () => {
    const base = layer("base", null);
    const ia = image("img", [base]);
    removeImageRecord(db, ia, "test");
    const young = planNow(Date.now() + MIN);
    expect(young.actions).toEqual([]);
    expect(young.skips.map((x) => [x.thinId, x.reason, x.orphanReason])).toEqual([[base.thinId, "too_young", "unreferenced_layer"]]);
    const me = currentHolder("bun scripts/unpack.ts");
    putLockRow(db, { key: `image:${POOL}:other`, pid: me.pid, start_time: me.startTime, host: me.host, command: me.command, acquired_at: me.acquiredAt });
    const locked = planNow();
    expect(locked.actions).toEqual([]);
    expect(locked.skips.map((x) => [x.thinId, x.reason])).toEqual([[base.thinId, "locked"]]);
    expect(locked.skips[0]!.detail).toContain(`image:${POOL}:other held by pid ${process.pid}`);
  });

  test("a released layer whose thin id is already gone from the pool: repaired, the layer row lets go of it", () => {
    const base = layer("base", null);
    removeImageRecord(db, image("img", [base]), "test");
    const rows = readGcRows(db, POOL);
    const { view } = buildDbView(POOL, rows, alive);
    const p = makePlan({
      dm: { pool: { name: POOL, major: 254, minor: 0 }, ours: [], foreign: [], unrelated: 0 },
      meta: { status: "ok", method: "thin_ls", ids: new Map(), blockBytes: 65536, transactionId: null, staleHold: null, skipped: null, metaDev: "/dev/loop0" },
      mounts: new Map(),
      mountPoints: new Set(),
      db: view,
      now: T + 60 * MIN,
      graceMs: GRACE,
      scannedAt: T + 60 * MIN,
    });
    expect(p.repairs.map((r) => [r.kind, r.thinId, r.refs])).toEqual([
      [
        "thin_already_deleted",
        base.thinId,
        [
          { table: "thin_ids", key: base.thinId },
          { table: "layers", key: base.id },
        ],
      ],
    ]);
  });
});
