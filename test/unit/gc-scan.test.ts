// GC's parsing and classification of what the kernel shows (fixtures taken from real dmsetup output
// in the test VM), and the DB view built from store rows.
import { describe, expect, test } from "bun:test";
import { devPathFor } from "../../lib/dm/metadata-snap.ts";
import { parseMountinfo } from "../../lib/dm/mount.ts";
import { parseThinTable } from "../../lib/dm/pool.ts";
import { buildDbView } from "../../lib/gc/db-view.ts";
import { mountsByDevice } from "../../lib/gc/mounts.ts";
import { classifyDevices, parseTableAll, type RawDevice } from "../../lib/gc/scan-dm.ts";
import type { GcRows } from "../../lib/store/gc-queries.ts";
import type { LayerRow } from "../../lib/store/layers.ts";
import type { LockRow } from "../../lib/store/locks.ts";
import type { SnapshotRow } from "../../lib/store/snapshots.ts";
import type { ThinIdRow } from "../../lib/store/thin-ids.ts";
import type { WorkRow } from "../../lib/store/work.ts";

// verbatim `dmsetup table` from the VM (note the tableless device's "name: ")
const TABLE_ALL = `foreign1: 0 2097152 thin 254:0 2
thinimg-xpool-layer-9: 
thinimg-xpool-snap-1: 0 2097152 thin 254:0 1
xpool: 0 524288 thin-pool 7:0 7:1 128 100 1 error_if_no_space 
`;

describe("dmsetup table parsing", () => {
  test("all devices, tableless ones absent", () => {
    const t = parseTableAll(TABLE_ALL, ["foreign1", "thinimg-xpool-layer-9", "thinimg-xpool-snap-1", "xpool"]);
    expect(t.get("foreign1")).toBe("0 2097152 thin 254:0 2");
    expect(t.has("thinimg-xpool-layer-9")).toBe(false);
    expect(t.get("xpool")).toStartWith("0 524288 thin-pool 7:0 7:1");
  });
  test("multi-target devices keep every line; names with ': ' are matched from the known set", () => {
    const t = parseTableAll("odd: name: 0 10 linear 8:1 0\nmulti: 0 10 zero\nmulti: 10 10 zero\n", ["odd: name", "multi"]);
    expect(t.get("odd: name")).toBe("0 10 linear 8:1 0");
    expect(t.get("multi")).toBe("0 10 zero\n10 10 zero");
  });
  test("thin table", () => {
    expect(parseThinTable("0 2097152 thin 254:0 17")).toEqual({ poolMajorMinor: "254:0", thinId: 17, sectors: 2097152 });
    expect(parseThinTable("0 2097152 thin 254:0 17 254:9")?.thinId).toBe(17); // external origin
    expect(parseThinTable("0 10 linear 8:1 0")).toBeNull();
    expect(parseThinTable("0 10 thin 254:0 1\n10 10 thin 254:0 2")).toBeNull();
    expect(parseThinTable(null)).toBeNull();
  });
});

const raw = (name: string, table: string | null, o: Partial<RawDevice> = {}): RawDevice => ({
  name,
  major: 254,
  minor: Math.floor(Math.random() * 1000) + 10,
  open: 0,
  suspended: false,
  inactiveTable: false,
  table,
  ...o,
});

describe("device classification", () => {
  const devices = [
    raw("tp", "0 524288 thin-pool 7:0 7:1 128 100 1 error_if_no_space", { minor: 0 }),
    raw("other-pool", "0 524288 thin-pool 7:2 7:3 128 100 0", { minor: 1 }),
    raw("thinimg-tp-snap-1", "0 2097152 thin 254:0 1"),
    raw("thinimg-tp-layer-2", "0 2097152 thin 254:0 2"),
    raw("thinimg-tp-snap-9", null), // create killed before the table load
    raw("vm-disk", "0 2097152 thin 254:0 3"), // foreign: on our pool, not our prefix
    raw("thinimg-tp-snap-4", "0 2097152 thin 254:1 4"), // our prefix, other pool
    raw("thinimg-tp-odd", "0 100 linear 8:1 0"), // our prefix, not thin
    raw("thinimg-tp-b-snap-5", null), // prefix of a pool named "tp-b": not ours
    raw("lvm-root", "0 100 linear 8:1 0"),
    raw("other-thin", "0 2097152 thin 254:1 1"),
  ];
  const s = classifyDevices("tp", "thinimg", devices);
  test("ours: prefix + thin on this pool (by major:minor), or prefix + no table", () => {
    expect(s.ours.map((d) => [d.name, d.thin?.thinId ?? null])).toEqual([
      ["thinimg-tp-snap-1", 1],
      ["thinimg-tp-layer-2", 2],
      ["thinimg-tp-snap-9", null],
    ]);
    // the pool's own table comes along: the metadata scan need not read it again
    expect(s.pool).toEqual({ name: "tp", major: 254, minor: 0, table: devices.find((d) => d.name === "tp")!.table });
  });
  test("foreign: listed with why; unrelated only counted", () => {
    expect(s.foreign.map((f) => [f.name, f.why, f.thinId])).toEqual([
      ["vm-disk", "no_prefix_on_pool", 3],
      ["thinimg-tp-snap-4", "prefix_other_target", null],
      ["thinimg-tp-odd", "prefix_other_target", null],
      ["thinimg-tp-b-snap-5", "prefix_other_target", null],
    ]);
    expect(s.unrelated).toBe(3);
  });
  test("missing pool is a clear error", () => {
    expect(() => classifyDevices("nope", "thinimg", devices)).toThrow(/pool nope is not an active dm device/);
  });
});

describe("mounts", () => {
  const mi = parseMountinfo(
    [
      "30 1 0:20 / / rw - hostfs none rw",
      "41 30 254:5 / /var/lib/thinimg/mnt/thinimg-tp-layer-5 rw,nosuid,nodev - ext4 /dev/mapper/thinimg-tp-layer-5 rw",
      "42 30 254:6 / /srv/vm6 rw - ext4 /dev/mapper/thinimg-tp-snap-6 rw",
      "43 30 254:6 /sub /var/lib/thinimg/mnt/bind rw - ext4 /dev/mapper/thinimg-tp-snap-6 rw",
    ].join("\n"),
  );
  const m = mountsByDevice(
    [
      { name: "thinimg-tp-layer-5", major: 254, minor: 5 },
      { name: "thinimg-tp-snap-6", major: 254, minor: 6 },
      { name: "thinimg-tp-snap-7", major: 254, minor: 7 },
    ],
    mi,
    "/var/lib/thinimg/mnt",
  );
  test("ours only under the mount dir and only for the device root", () => {
    expect(m.get("thinimg-tp-layer-5")).toEqual([
      { mountPoint: "/var/lib/thinimg/mnt/thinimg-tp-layer-5", majorMinor: "254:5", source: "/dev/mapper/thinimg-tp-layer-5", ours: true },
    ]);
    expect(m.get("thinimg-tp-snap-6")?.map((x) => [x.mountPoint, x.ours])).toEqual([
      ["/srv/vm6", false],
      ["/var/lib/thinimg/mnt/bind", false],
    ]);
    expect(m.has("thinimg-tp-snap-7")).toBe(false);
  });
  test("metadata device path from major:minor via sysfs uevent", async () => {
    const dir = `/tmp/gc-unit-${process.pid}`;
    await Bun.write(`${dir}/sys/dev/block/7:0/uevent`, "MAJOR=7\nMINOR=0\nDEVNAME=loop0\nDEVTYPE=disk\n");
    expect(devPathFor("7:0", { dev: `${dir}/dev`, sys: `${dir}/sys` })).toBe(`${dir}/dev/loop0`);
    expect(devPathFor("7:9", { dev: `${dir}/dev`, sys: `${dir}/sys` })).toBeNull();
    expect(devPathFor("/dev/loop3")).toBe("/dev/loop3");
  });
});

// ---- DB view from rows ----
const T0 = 1_700_000_000_000;
const ledger = (thin_id: number, state: ThinIdRow["state"], owner_kind: ThinIdRow["owner_kind"] = "none", owner_id: number | null = null): ThinIdRow => ({
  pool: "tp",
  thin_id,
  owner_kind,
  owner_id,
  origin_thin_id: null,
  state,
  reason: null,
  created_at: T0,
  updated_at: T0,
});
const layer = (id: number, thin_id: number | null, state: LayerRow["state"], o: Partial<LayerRow> = {}): LayerRow => ({
  id,
  pool: "tp",
  chain_id: `sha256:${id}`,
  parent_id: null,
  parent_chain_id: null,
  identity: `sha256:${id}`,
  diff_id: null,
  digest: `sha256:${id}`,
  size: 1,
  thin_id,
  device_name: thin_id === null ? null : `thinimg-tp-layer-${thin_id}`,
  virtual_size: 1 << 30,
  state,
  phase: state === "committed" ? "committed" : "mounted",
  attempt: 1,
  error: state === "failed" ? "boom" : null,
  error_kind: null,
  stats: null,
  created_at: T0,
  updated_at: T0 + id,
  committed_at: null,
  ...o,
});
const snap = (id: number, thin_id: number, state: SnapshotRow["state"], pid = 999999): SnapshotRow => ({
  id,
  pool: "tp",
  image_id: 1,
  layer_id: 1,
  thin_id,
  device_name: `thinimg-tp-snap-${thin_id}`,
  state,
  error: null,
  pid,
  command: "bun scripts/activate.ts",
  created_at: T0,
  updated_at: T0,
  activated_at: state === "active" ? T0 : null,
  released_at: null,
  virtual_size: 1 << 30,
});
const lockRow = (key: string, pid: number): LockRow => ({ key, pid, start_time: null, host: "h", command: "bun scripts/unpack.ts", acquired_at: T0 });
const work = (layerId: number, state: WorkRow["state"], pid: number): WorkRow => ({
  id: layerId,
  pool: "tp",
  kind: "build_layer",
  subject: `layer:${layerId}`,
  state,
  pid,
  start_time: null,
  host: "h",
  command: "bun scripts/unpack.ts",
  error: null,
  error_kind: null,
  leaks: null,
  created_at: T0,
  updated_at: T0,
  finished_at: null,
});
const rows = (o: Partial<GcRows>): GcRows => ({
  thinIds: [],
  layers: [],
  snapshots: [],
  devices: [],
  mounts: [],
  images: [{ id: 1, name: "web", state: "ready", updated_at: T0 }],
  imageLayers: [{ image_id: 1, layer_id: 1 }],
  runningWork: [],
  ...o,
});

describe("DB view", () => {
  const alive = (pid: number) => pid === 4242;
  test("owners decide: committed layer / active snapshot / building live; failed, released, dead pending dead", () => {
    const { view } = buildDbView(
      "tp",
      rows({
        thinIds: [
          ledger(1, "committed", "layer", 1),
          ledger(2, "created", "layer", 2),
          ledger(3, "created", "layer", 3),
          ledger(4, "committed", "snapshot", 1),
          ledger(5, "orphaned", "snapshot", 2),
          ledger(6, "created", "snapshot", 3),
          ledger(7, "created", "snapshot", 4),
        ],
        layers: [layer(1, 1, "committed"), layer(2, 2, "building"), layer(3, 3, "failed")],
        snapshots: [snap(1, 4, "active"), snap(2, 5, "released"), snap(3, 6, "pending"), snap(4, 7, "pending", 4242)],
        locks: [lockRow("layer:tp:sha256:2", 4242)],
      }),
      alive,
    );
    const st = (id: number) => [view.thins.get(id)?.status, view.thins.get(id)?.reason ?? null, view.thins.get(id)?.mustExist];
    expect(st(1)).toEqual(["live", null, true]);
    expect(st(2)).toEqual(["live", null, false]);
    expect(st(3)).toEqual(["dead", "db_failed", false]);
    expect(st(4)).toEqual(["live", null, true]);
    expect(st(5)).toEqual(["dead", "db_released", false]);
    expect(st(6)).toEqual(["dead", "db_failed", false]);
    expect(view.thins.get(6)?.detail).toContain("interrupted");
    expect(st(7)).toEqual(["live", null, false]);
    expect(view.known).toBe(true);
    // refs for repair of the committed layer include the image using it
    expect(view.thins.get(1)?.refs).toContainEqual({ table: "images", key: 1 });
  });

  test("a building layer whose builder is dead is an interrupted build; a live lock or running work keeps it", () => {
    const thinIds = [ledger(2, "created", "layer", 2)];
    const dead = buildDbView("tp", rows({ thinIds, layers: [layer(2, 2, "building")], locks: [lockRow("layer:tp:sha256:2", 31337)] }), alive);
    expect(dead.view.thins.get(2)).toMatchObject({ status: "dead", reason: "interrupted_build", since: T0 + 2, locked: null });
    expect(dead.view.thins.get(2)?.detail).toContain("pid 31337 dead since");
    expect(dead.view.devices.get("thinimg-tp-layer-2")).toMatchObject({ status: "dead", reason: "interrupted_build" });
    expect(dead.notes.join(" ")).toContain("interrupted build");
    const byWork = buildDbView("tp", rows({ thinIds, layers: [layer(2, 2, "building")], buildWork: [work(2, "running", 4242)] }), alive);
    expect(byWork.view.thins.get(2)?.status).toBe("live");
    const doneWork = buildDbView("tp", rows({ thinIds, layers: [layer(2, 2, "building")], buildWork: [work(2, "interrupted", 4242)] }), alive);
    expect(doneWork.view.thins.get(2)?.reason).toBe("interrupted_build");
  });

  test("a failed or interrupted layer is locked while a live process holds its chain's lock or any image lock of the pool", () => {
    const thinIds = [ledger(3, "created", "layer", 3)];
    const free = buildDbView(
      "tp",
      rows({ thinIds, layers: [layer(3, 3, "failed")], locks: [lockRow("image:tp:web", 31337), lockRow("image:other:x", 4242)] }),
      alive,
    );
    expect(free.view.thins.get(3)).toMatchObject({ status: "dead", reason: "db_failed", locked: null });
    const byLayer = buildDbView("tp", rows({ thinIds, layers: [layer(3, 3, "failed")], locks: [lockRow("layer:tp:sha256:3", 4242)] }), alive);
    expect(byLayer.view.thins.get(3)?.locked).toContain("layer:tp:sha256:3 held by pid 4242");
    expect(byLayer.view.devices.get("thinimg-tp-layer-3")?.locked).toContain("pid 4242");
    const byImage = buildDbView("tp", rows({ thinIds, layers: [layer(3, 3, "failed")], locks: [lockRow("image:tp:web", 4242)] }), alive);
    expect(byImage.view.thins.get(3)?.locked).toContain("image:tp:web");
    // a released snapshot is not a layer: image locks do not keep it
    const snapView = buildDbView(
      "tp",
      rows({ thinIds: [ledger(5, "orphaned", "snapshot", 2)], snapshots: [snap(2, 5, "released")], locks: [lockRow("image:tp:web", 4242)] }),
      alive,
    );
    expect(snapView.view.thins.get(5)?.locked ?? null).toBeNull();
  });

  test("a handed-out snapshot's device must exist whatever its device row says (a reboot, a failed release); a released one's need not", () => {
    for (const rowState of ["active", "removed", "removing", "leaked"] as const) {
      const devices = [
        { pool: "tp", name: "thinimg-tp-snap-4", thin_id: 4, kind: "snap" as const, state: rowState, reason: null, created_at: T0, updated_at: T0 },
      ];
      const { view } = buildDbView("tp", rows({ thinIds: [ledger(4, "committed", "snapshot", 1)], snapshots: [snap(1, 4, "active")], devices }), alive);
      expect(view.devices.get("thinimg-tp-snap-4")).toMatchObject({ status: "live", mustExist: true, snapshotId: 1 });
      expect(view.thins.get(4)).toMatchObject({ status: "live" });
    }
    const released = buildDbView("tp", rows({ thinIds: [ledger(4, "orphaned", "snapshot", 1)], snapshots: [snap(1, 4, "released")] }), alive);
    expect(released.view.devices.get("thinimg-tp-snap-4")).toMatchObject({ status: "dead", mustExist: false });
  });

  test("first-seen ids and the DB's last transaction id are passed through", () => {
    const { view } = buildDbView("tp", rows({ firstSeen: [{ thin_id: 900, first_seen_at: T0 }], lastTxn: 12 }), alive);
    expect(view.firstSeen?.get(900)).toBe(T0);
    expect(view.lastTxn).toBe(12);
  });

  test("a hand-deleted owner row: owner_missing; a superseded attempt: orphaned", () => {
    const { view } = buildDbView(
      "tp",
      rows({
        thinIds: [ledger(8, "committed", "snapshot", 77), ledger(9, "created", "layer", 1)],
        layers: [layer(1, 10, "building")],
        locks: [lockRow("layer:tp:sha256:1", 4242)],
      }),
      alive,
    );
    expect(view.thins.get(8)?.reason).toBe("owner_missing");
    expect(view.thins.get(9)?.reason).toBe("db_orphaned");
    expect(view.thins.get(9)?.detail).toContain("superseded");
  });

  test("a live reference beats a dead ledger state (kept, with a note)", () => {
    const { view, notes } = buildDbView("tp", rows({ thinIds: [ledger(1, "orphaned", "layer", 1)], layers: [layer(1, 1, "committed")] }), alive);
    expect(view.thins.get(1)?.status).toBe("live");
    expect(notes.join(" ")).toContain("ledger says orphaned");
  });

  test("deleting / deleted ledger states", () => {
    const { view } = buildDbView("tp", rows({ thinIds: [ledger(1, "deleting"), ledger(2, "deleted")] }), alive);
    expect(view.thins.get(1)?.reason).toBe("db_deleting");
    expect(view.thins.get(2)?.status).toBe("deleted");
  });

  test("devices: active snapshot's device must exist; committed layer's active device is not held; leaked is dead", () => {
    const { view } = buildDbView(
      "tp",
      rows({
        thinIds: [ledger(1, "committed", "layer", 1), ledger(4, "committed", "snapshot", 1), ledger(5, "orphaned")],
        layers: [layer(1, 1, "committed")],
        snapshots: [snap(1, 4, "active")],
        devices: [
          { pool: "tp", name: "thinimg-tp-snap-4", thin_id: 4, kind: "snap", state: "active", reason: null, created_at: T0, updated_at: T0 },
          { pool: "tp", name: "thinimg-tp-layer-1", thin_id: 1, kind: "layer", state: "removed", reason: null, created_at: T0, updated_at: T0 },
          { pool: "tp", name: "thinimg-tp-layer-5", thin_id: 5, kind: "layer", state: "leaked", reason: "abandoned", created_at: T0, updated_at: T0 },
        ],
      }),
      alive,
    );
    expect(view.devices.get("thinimg-tp-snap-4")).toMatchObject({ status: "live", mustExist: true });
    expect(view.devices.get("thinimg-tp-layer-1")?.status).not.toBe("live");
    expect(view.devices.get("thinimg-tp-layer-5")).toMatchObject({ status: "dead", reason: "db_failed" });
  });

  test("empty DB is not 'known'", () => {
    expect(buildDbView("tp", rows({ images: [], imageLayers: [] }), alive).view.known).toBe(false);
  });
});
