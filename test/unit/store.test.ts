// The state DB on real SQLite files: schema, constraints, migrations, and the thin id ledger under
// concurrent processes.

import { Database } from "bun:sqlite";
import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import {
  allocateThinId,
  beginImage,
  getImageByName,
  imageLayerIds,
  insertLayer,
  listThinIds,
  MIGRATIONS,
  markImageBuildFailed,
  markImageReady,
  openDb,
  recordOrphanThinId,
  setThinIdState,
  updateLayer,
} from "../../lib/store/index.ts";

const dir = mkdtempSync("/tmp/thinimg-store-test-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const fresh = () => openDb(join(dir, `s${++n}`, "state.db"));

describe("schema", () => {
  test("ten processes opening one fresh state dir at once all migrate it (once) and succeed", async () => {
    const path = join(dir, `race-${++n}`, "state.db");
    const script = `import { openDb } from "${join(import.meta.dir, "../../lib/store/index.ts")}"; openDb(${JSON.stringify(path)}).close(); console.log("ok");`;
    const procs = Array.from({ length: 10 }, () => Bun.spawn(["bun", "-e", script], { stdout: "pipe", stderr: "pipe" }));
    const outs = await Promise.all(procs.map(async (p) => `${await new Response(p.stdout).text()}${await new Response(p.stderr).text()}`.trim()));
    expect(outs).toEqual(Array(10).fill("ok"));
    const db = new Database(path, { readonly: true });
    expect((db.query("PRAGMA user_version").get() as { user_version: number }).user_version).toBe(MIGRATIONS.length);
    db.close();
  }, 60_000);

  test("migrates to the latest version with WAL, foreign keys and STRICT tables", () => {
    const db = fresh();
    expect((db.query("PRAGMA user_version").get() as { user_version: number }).user_version).toBe(MIGRATIONS.length);
    expect((db.query("PRAGMA journal_mode").get() as { journal_mode: string }).journal_mode).toBe("wal");
    expect((db.query("PRAGMA foreign_keys").get() as { foreign_keys: number }).foreign_keys).toBe(1);
    const tables = (db.query("SELECT name, sql FROM sqlite_master WHERE type = 'table'").all() as { name: string; sql: string }[]).map((t) => t.name);
    for (const t of ["blobs", "thin_ids", "devices", "mounts", "layers", "images", "image_layers", "snapshots", "locks", "work", "steps"]) {
      expect(tables).toContain(t);
    }
    // STRICT: a string in an INTEGER column is refused
    expect(() => db.query("INSERT INTO locks (key, pid, host, command, acquired_at) VALUES ('k', 'abc', 'h', 'c', 1)").run()).toThrow(
      /cannot store TEXT value in INTEGER column/,
    );
    // CHECK on states
    expect(() =>
      db.query("INSERT INTO thin_ids (pool, thin_id, owner_kind, state, created_at, updated_at) VALUES ('p', 1, 'layer', 'bogus', 1, 1)").run(),
    ).toThrow(/CHECK constraint/);
    db.close();
  });

  test("re-opening does not re-run migrations and keeps data", () => {
    const path = join(dir, "reopen", "state.db");
    const a = openDb(path);
    allocateThinId(a, "p", { kind: "layer", id: null });
    a.close();
    const b = openDb(path);
    expect(listThinIds(b, "p").map((r) => r.thin_id)).toEqual([1]);
    b.close();
  });

  test("upgrade: snapshots an older GC failed only because their device was gone get their data back, unless already deleted", () => {
    const path = join(dir, "rescue", "state.db");
    mkdirSync(join(dir, "rescue"));
    // the schema of the release before: migrations 1-3
    const old = new Database(path);
    for (let i = 0; i < 3; i++) old.exec(MIGRATIONS[i]!);
    old.exec("PRAGMA user_version = 3");
    const gcError = "snapshot 1 of image web active: /dev/mapper/thinimg-tp-snap-N no longer exists (removed outside thinimg); marked failed";
    old.exec(`
      INSERT INTO layers (id, pool, chain_id, identity, digest, size, thin_id, virtual_size, state, phase, created_at, updated_at) VALUES (1, 'tp', 'c', 'i', 'sha256:x', 1, NULL, 1073741824, 'committed', 'committed', 1, 1);
      INSERT INTO images (id, pool, name, source, state, created_at, updated_at) VALUES (1, 'tp', 'web', 's', 'ready', 1, 1);
      INSERT INTO thin_ids (pool, thin_id, owner_kind, owner_id, state, reason, created_at, updated_at) VALUES
        ('tp', 6, 'snapshot', 1, 'orphaned', 'gc: its device was removed outside thinimg', 1, 1),
        ('tp', 7, 'snapshot', 2, 'deleted', 'gc: deleted', 1, 1),
        ('tp', 8, 'snapshot', 3, 'orphaned', 'gc: its device was removed outside thinimg', 1, 1),
        ('tp', 9, 'snapshot', 4, 'orphaned', 'snapshot 4 released', 1, 1);
      INSERT INTO snapshots (id, pool, image_id, layer_id, thin_id, device_name, state, error, created_at, updated_at) VALUES
        (1, 'tp', 1, 1, 6, 'thinimg-tp-snap-6', 'failed', '${gcError}', 1, 1),
        (2, 'tp', 1, 1, 7, 'thinimg-tp-snap-7', 'failed', '${gcError}', 1, 1),
        (3, 'tp', 1, 1, 8, 'thinimg-tp-snap-8', 'failed', 'activation failed: boom', 1, 1),
        (4, 'tp', 1, 1, 9, 'thinimg-tp-snap-9', 'released', NULL, 1, 1);
    `);
    old.close();
    const db = openDb(path);
    const snaps = db.query("SELECT id, state, error, virtual_size FROM snapshots ORDER BY id").all() as {
      id: number;
      state: string;
      error: string | null;
      virtual_size: number | null;
    }[];
    expect(snaps.map((x) => [x.id, x.state])).toEqual([
      [1, "active"],
      [2, "failed"],
      [3, "failed"],
      [4, "released"],
    ]);
    expect(snaps[0]!.error).toBeNull();
    expect(snaps.every((x) => x.virtual_size === null)).toBe(true);
    expect(listThinIds(db, "tp").map((t) => [t.thin_id, t.state])).toEqual([
      [6, "committed"],
      [7, "deleted"],
      [8, "orphaned"],
      [9, "orphaned"],
    ]);
    db.close();
  });

  test("a DB from a newer thinimg is refused with a one-line error", () => {
    const path = join(dir, "newer", "state.db");
    openDb(path).close();
    const raw = new Database(path);
    raw.exec(`PRAGMA user_version = ${MIGRATIONS.length + 5}`);
    raw.close();
    expect(() => openDb(path)).toThrow(/has schema version .* upgrade thinimg|this thinimg knows/);
  });

  test("layers.phase is checked: an unknown phase is refused on insert and update", () => {
    const db = fresh();
    const l = insertLayer(db, {
      pool: "p",
      chainId: "sha256:ph",
      parentId: null,
      parentChainId: null,
      identity: "x",
      diffId: null,
      digest: "sha256:x",
      size: 1,
      virtualSize: 1,
    });
    updateLayer(db, l.id, { phase: "mounted" });
    expect(() => updateLayer(db, l.id, { phase: "half-mounted" as never })).toThrow(/CHECK constraint failed: layers.phase/);
    expect(() =>
      db
        .query(
          "INSERT INTO layers (pool, chain_id, identity, digest, size, virtual_size, state, phase, attempt, created_at, updated_at) VALUES ('p','sha256:q','x','d',1,1,'building','bogus',0,0,0)",
        )
        .run(),
    ).toThrow(/CHECK constraint failed: layers.phase/);
    expect((db.query("SELECT phase FROM layers WHERE id = ?").get(l.id) as { phase: string }).phase).toBe("mounted");
    db.close();
  });

  test("foreign keys: a layer cannot point at a thin id missing from the ledger", () => {
    const db = fresh();
    const l = insertLayer(db, {
      pool: "p",
      chainId: "sha256:aa",
      parentId: null,
      parentChainId: null,
      identity: "sha256:bb",
      diffId: "sha256:bb",
      digest: "sha256:cc",
      size: 1,
      virtualSize: 1 << 30,
    });
    expect(() => updateLayer(db, l.id, { thin_id: 77 })).toThrow(/FOREIGN KEY/);
    const id = allocateThinId(db, "p", { kind: "layer", id: l.id });
    updateLayer(db, l.id, { thin_id: id });
    // chain ids are unique per pool, not globally
    expect(() =>
      insertLayer(db, {
        pool: "p",
        chainId: "sha256:aa",
        parentId: null,
        parentChainId: null,
        identity: "x",
        diffId: null,
        digest: "sha256:cc",
        size: 1,
        virtualSize: 1,
      }),
    ).toThrow(/UNIQUE/);
    insertLayer(db, {
      pool: "q",
      chainId: "sha256:aa",
      parentId: null,
      parentChainId: null,
      identity: "x",
      diffId: null,
      digest: "sha256:cc",
      size: 1,
      virtualSize: 1,
    });
    db.close();
  });
});

describe("thin id ledger", () => {
  test("ids are sequential per pool and never reused while rows exist", () => {
    const db = fresh();
    const a = allocateThinId(db, "p1", { kind: "layer", id: null });
    const b = allocateThinId(db, "p1", { kind: "snapshot", id: null });
    const c = allocateThinId(db, "p2", { kind: "layer", id: null });
    expect([a, b, c]).toEqual([1, 2, 1]);
    setThinIdState(db, "p1", b, "deleted", "gc confirmed");
    // a deleted id is not handed out again while the space has room
    expect(allocateThinId(db, "p1", { kind: "layer", id: null })).toBe(3);
    // an id found to exist already is recorded orphaned; the next allocation skips past it
    recordOrphanThinId(db, "p1", 10, "existed in the pool");
    expect(allocateThinId(db, "p1", { kind: "layer", id: null })).toBe(11);
    expect(listThinIds(db, "p1", ["orphaned"]).map((r) => [r.thin_id, r.reason])).toEqual([[10, "existed in the pool"]]);
    db.close();
  });

  test("deleted ids are reused only when the 24-bit space is exhausted", () => {
    const db = fresh();
    recordOrphanThinId(db, "p", 16777215, "top of the space");
    recordOrphanThinId(db, "p", 5, "found in pool");
    setThinIdState(db, "p", 5, "deleted", "gc confirmed");
    // max is at the top of the 24-bit space: the lowest GC-confirmed deleted id comes back
    expect(allocateThinId(db, "p", { kind: "snapshot", id: 9 })).toBe(5);
    expect(listThinIds(db, "p").map((r) => [r.thin_id, r.state, r.owner_kind])).toEqual([
      [5, "allocated", "snapshot"],
      [16777215, "orphaned", "none"],
    ]);
    expect(() => allocateThinId(db, "p", { kind: "layer", id: null })).toThrow(/thin ids are in use or awaiting GC/);
    db.close();
  });

  test("four processes allocating at once never get the same id", async () => {
    const path = join(dir, "concurrent", "state.db");
    openDb(path).close();
    const code = `import { openDb, allocateThinId } from ${JSON.stringify(join(import.meta.dir, "../../lib/store/index.ts"))};
      const db = openDb(${JSON.stringify(path)}); const ids = [];
      for (let i = 0; i < 40; i++) ids.push(allocateThinId(db, "p", { kind: "layer", id: null }));
      console.log(JSON.stringify(ids));`;
    const procs = Array.from({ length: 4 }, () => Bun.spawn(["bun", "-e", code], { stdout: "pipe", stderr: "inherit" }));
    const outs = await Promise.all(procs.map(async (p) => JSON.parse(await new Response(p.stdout).text()) as number[]));
    const all = outs.flat();
    expect(all).toHaveLength(160);
    expect(new Set(all).size).toBe(160);
    expect(Math.max(...all)).toBe(160);
  });
});

describe("images", () => {
  test("ready image keeps its layers in order, and stays ready through a rebuild until the new layers are swapped in", () => {
    const db = fresh();
    const mk = (c: string, parentId: number | null) =>
      insertLayer(db, { pool: "p", chainId: c, parentId, parentChainId: null, identity: c, diffId: null, digest: "sha256:x", size: 1, virtualSize: 1 });
    const l1 = mk("sha256:1", null);
    const l2 = mk("sha256:2", l1.id);
    const img = beginImage(db, { pool: "p", name: "app", source: "/src", format: null });
    markImageReady(db, img.id, { format: "oci-layout", config: { Env: ["A=1"] }, layerIds: [l1.id, l2.id], topChainId: "sha256:2" });
    const r = getImageByName(db, "p", "app")!;
    expect(r.state).toBe("ready");
    expect(r.top_layer_id).toBe(l2.id);
    expect(JSON.parse(r.config!)).toEqual({ Env: ["A=1"] });
    expect(imageLayerIds(db, img.id)).toEqual([l1.id, l2.id]);
    // a refresh / new source: the ready image keeps serving (state, source, layers) …
    const again = beginImage(db, { pool: "p", name: "app", source: "/other", format: null });
    expect(again.id).toBe(img.id);
    expect(again).toMatchObject({ state: "ready", source: "/src", format: "oci-layout", top_layer_id: l2.id });
    // … a failed rebuild does not take it out of service (its devices are intact) …
    markImageBuildFailed(db, img.id, "layer 1/1: boom", "io");
    expect(getImageByName(db, "p", "app")).toMatchObject({ state: "ready", error: "layer 1/1: boom", top_layer_id: l2.id });
    expect(imageLayerIds(db, img.id)).toEqual([l1.id, l2.id]);
    // … until markImageReady swaps in the new layer list and source
    beginImage(db, { pool: "p", name: "app", source: "/other", format: null });
    markImageReady(db, img.id, { source: "/other", format: "docker-archive", config: null, layerIds: [l1.id], topChainId: "sha256:1" });
    expect(getImageByName(db, "p", "app")).toMatchObject({ state: "ready", source: "/other", error: null, top_layer_id: l1.id });
    expect(imageLayerIds(db, img.id)).toEqual([l1.id]);
    // a build of an image that was never ready fails it
    const other = beginImage(db, { pool: "p", name: "new", source: "/n", format: null });
    expect(other.state).toBe("unpacking");
    markImageBuildFailed(db, other.id, "x", "io");
    expect(getImageByName(db, "p", "new")!.state).toBe("failed");
    db.close();
  });
});
