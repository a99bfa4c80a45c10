// GC's DB writes against a real SQLite file: the compare-and-set claim before each orphan (an unpack
// re-run that changed the rows since the plan wins; a live lock holder keeps it), the interrupted-build
// collection (the pipeline's abandon), and repairs applied only to unchanged rows.
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { applyRepairs, storeLedger } from "../../lib/gc/ledger.ts";
import type { Orphan, Repair } from "../../lib/gc/model.ts";
import { currentHolder } from "../../lib/lock/owner.ts";
import { type Db, openDb } from "../../lib/store/db.ts";
import { setDevice } from "../../lib/store/devices.ts";
import { actionWitness, actionWitnesses, readGcRows, recordFirstSeen, refsWitness } from "../../lib/store/gc-queries.ts";
import { getLayer, insertLayer, updateLayer } from "../../lib/store/layers.ts";
import { putLockRow } from "../../lib/store/locks.ts";
import { getMount, setMount } from "../../lib/store/mounts.ts";
import { allocateThinId, getThinId, setThinIdState } from "../../lib/store/thin-ids.ts";

const POOL = "tp";
let dir: string;
let db: Db;
const alive = (pid: number) => pid === process.pid;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "thinimg-gc-ledger-"));
  db = openDb(join(dir, "state.db"));
});
afterEach(() => {
  db.close();
  rmSync(dir, { recursive: true, force: true });
});

function failedLayer(state: "failed" | "building" = "failed", chainId = "sha256:c1") {
  const l = insertLayer(db, {
    pool: POOL,
    chainId,
    parentId: null,
    parentChainId: null,
    identity: "x",
    diffId: null,
    digest: "sha256:d",
    size: 1,
    virtualSize: 1 << 20,
  });
  const id = allocateThinId(db, POOL, { kind: "layer", id: l.id });
  setThinIdState(db, POOL, id, "created");
  const name = `thinimg-${POOL}-layer-${id}`;
  setDevice(db, { pool: POOL, name, thinId: id, kind: "layer", state: "active" });
  setMount(db, { path: `/s/mnt/${name}`, pool: POOL, deviceName: name, thinId: id, purpose: "apply", state: "mounted" });
  updateLayer(db, l.id, { thin_id: id, device_name: name, phase: "mounted", state });
  return { layerId: l.id, thinId: id, name };
}

const orphanOf = (thinId: number, device: string, reason: Orphan["reason"] = "db_failed"): Orphan => ({
  thinId,
  device,
  unmount: [],
  deleteThin: true,
  reason,
  detail: "",
  ageMs: 0,
  mappedBytes: null,
  witness: actionWitness(readGcRows(db, POOL), thinId, device),
});

describe("witnesses", () => {
  test("indexed once for a whole plan: the same string as actionWitness for every (thin id, device)", () => {
    const a = failedLayer();
    const b = failedLayer("building", "sha256:c2");
    // a device row whose name another layer also uses, and a second device of the same thin id
    setDevice(db, { pool: POOL, name: "thinimg-tp-snap-9", thinId: a.thinId, kind: "snap", state: "active" });
    updateLayer(db, b.layerId, { device_name: a.name });
    const rows = readGcRows(db, POOL);
    const w = actionWitnesses(rows);
    const ids = [a.thinId, b.thinId, 999, null];
    const names = [a.name, b.name, "thinimg-tp-snap-9", "none", null];
    for (const id of ids) for (const n of names) expect(w(id, n)).toBe(actionWitness(rows, id, n));
    expect(w(a.thinId, a.name)).not.toBe(w(b.thinId, b.name));
  });
});

describe("claim (compare-and-set before acting)", () => {
  test("unchanged rows: claimed, the thin id is marked deleting; an abort restores it", () => {
    const f = failedLayer();
    const led = storeLedger(db, POOL, { alive });
    const a = orphanOf(f.thinId, f.name);
    expect(led.claim(a)).toBeNull();
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("deleting");
    led.thinDeleteAborted(f.thinId, "busy");
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("created");
  });

  test("an unpack re-run picked the failed layer up after the plan: refused, nothing written", async () => {
    const f = failedLayer();
    const a = orphanOf(f.thinId, f.name);
    await Bun.sleep(2);
    updateLayer(db, f.layerId, { state: "building" }); // what buildLayer does first
    expect(storeLedger(db, POOL, { alive }).claim(a)).toContain("changed since the scan");
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("created");
  });

  test("a live holder of the layer's chain lock or of an image lock: refused", () => {
    const f = failedLayer();
    const a = orphanOf(f.thinId, f.name);
    const me = currentHolder("bun scripts/unpack.ts");
    putLockRow(db, { key: `image:${POOL}:web`, pid: me.pid, start_time: me.startTime, host: me.host, command: me.command, acquired_at: me.acquiredAt });
    expect(storeLedger(db, POOL, { alive }).claim(a)).toContain(`image:${POOL}:web is now held by pid ${process.pid}`);
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("created");
    db.query("DELETE FROM locks").run();
    putLockRow(db, { key: `layer:${POOL}:sha256:c1`, pid: 999_999_9, start_time: null, host: me.host, command: "dead", acquired_at: 0 });
    expect(storeLedger(db, POOL, { alive }).claim(a)).toBeNull(); // a dead holder does not count
  });

  test("an interrupted build is abandoned the way the pipeline does it, then marked deleting", () => {
    const f = failedLayer("building");
    const led = storeLedger(db, POOL, { alive });
    expect(led.claim(orphanOf(f.thinId, f.name, "interrupted_build"))).toBeNull();
    const l = getLayer(db, f.layerId)!;
    expect([l.thin_id, l.device_name, l.phase, l.state]).toEqual([null, null, "new", "building"]);
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("deleting");
    expect((db.query("SELECT state FROM devices WHERE name = ?").get(f.name) as { state: string }).state).toBe("leaked");
    expect(getMount(db, `/s/mnt/${f.name}`)?.state).toBe("leaked");
    // the delete did not happen: back to orphaned (the layer no longer owns it)
    led.thinDeleteAborted(f.thinId, "busy");
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("orphaned");
  });
});

describe("confirmations (one durable transaction per delete)", () => {
  const unknown = (id: number): Orphan => ({
    thinId: id,
    device: null,
    unmount: [],
    deleteThin: true,
    reason: "not_in_db",
    detail: "",
    ageMs: 0,
    mappedBytes: null,
    witness: actionWitness(readGcRows(db, POOL), id, null),
  });

  test("a confirmed delete is written with the next claim, or by flush; its first sighting is forgotten", () => {
    recordFirstSeen(db, POOL, [41, 42, 43], Date.now());
    const led = storeLedger(db, POOL, { alive });
    expect(led.claim(unknown(41))).toBeNull();
    expect(getThinId(db, POOL, 41)?.state).toBe("deleting"); // the intent is on disk before the delete
    led.thinDeleted(41);
    expect(getThinId(db, POOL, 41)?.state).toBe("deleting"); // held back: a crash now leaves the intent
    expect(led.claim(unknown(42))).toBeNull();
    expect([getThinId(db, POOL, 41)?.state, getThinId(db, POOL, 42)?.state]).toEqual(["deleted", "deleting"]);
    led.thinDeleted(42);
    led.flush();
    expect(getThinId(db, POOL, 42)?.state).toBe("deleted");
    expect(readGcRows(db, POOL).firstSeen?.map((r) => r.thin_id)).toEqual([43]);
  });

  test("an abort writes what is held back too, and undoes only its own intent", () => {
    const led = storeLedger(db, POOL, { alive });
    expect(led.claim(unknown(51))).toBeNull();
    led.thinDeleted(51);
    expect(led.claim(unknown(52))).toBeNull();
    led.thinDeleteAborted(52, "busy");
    expect([getThinId(db, POOL, 51)?.state, getThinId(db, POOL, 52)?.state]).toEqual(["deleted", "orphaned"]);
  });
});

describe("repairs (compare-and-set)", () => {
  test("applied only while the rows are unchanged", async () => {
    const f = failedLayer();
    const refs: Repair["refs"] = [{ table: "thin_ids", key: f.thinId }];
    const r: Repair = {
      kind: "thin_already_deleted",
      thinId: f.thinId,
      device: null,
      path: null,
      detail: "gone",
      refs,
      witness: refsWitness(readGcRows(db, POOL), refs),
    };
    await Bun.sleep(2);
    setThinIdState(db, POOL, f.thinId, "created", "touched by a re-run");
    expect(applyRepairs(db, POOL, [r])).toEqual([r]);
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("created");
    const fresh = { ...r, witness: refsWitness(readGcRows(db, POOL), refs) };
    expect(applyRepairs(db, POOL, [fresh])).toEqual([]);
    expect(getThinId(db, POOL, f.thinId)?.state).toBe("deleted");
  });
});
