// Removing images on a real SQLite file (remove is DB-only: no dm work): idempotence, unknown names,
// the per-image lock, what list shows afterwards, a later re-unpack of the same name, and GC's claim
// on a released layer (made again from fresh rows just before the delete).
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { storeLedger } from "../../lib/gc/ledger.ts";
import type { Orphan } from "../../lib/gc/model.ts";
import { currentHolder } from "../../lib/lock/owner.ts";
import { type Ctx, makeCtx } from "../../lib/pipeline/context.ts";
import { inventory } from "../../lib/pipeline/inventory.ts";
import { removeImages } from "../../lib/pipeline/remove.ts";
import { actionWitness, readGcRows } from "../../lib/store/gc-queries.ts";
import { beginImage, getImageByName, markImageReady } from "../../lib/store/images.ts";
import { getLayer, insertLayer, updateLayer } from "../../lib/store/layers.ts";
import { putLockRow } from "../../lib/store/locks.ts";
import { insertSnapshot, updateSnapshot } from "../../lib/store/snapshots.ts";
import { allocateThinId, getThinId, setThinIdState } from "../../lib/store/thin-ids.ts";

const POOL = "tp";
let dir: string;
let ctx: Ctx;
const alive = (pid: number) => pid === process.pid;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "thinimg-lifecycle-"));
  ctx = makeCtx(loadConfig({ stateDir: dir, pool: POOL, wait: "0" }, {}), { command: "bun scripts/remove.ts" });
});
afterEach(() => {
  ctx.db.close();
  rmSync(dir, { recursive: true, force: true });
});

function layer(chain: string, parent: { id: number } | null) {
  const db = ctx.db;
  const l = insertLayer(db, { pool: POOL, chainId: `sha256:${chain}`, parentId: parent?.id ?? null, parentChainId: null, identity: chain, diffId: null, digest: `sha256:${chain}`, size: 1, virtualSize: 1 << 20 });
  const id = allocateThinId(db, POOL, { kind: "layer", id: l.id });
  setThinIdState(db, POOL, id, "committed");
  updateLayer(db, l.id, { thin_id: id, device_name: `thinimg-${POOL}-layer-${id}`, state: "committed", phase: "committed" });
  return { id: l.id, thinId: id };
}
function image(name: string, layers: { id: number }[]) {
  const i = beginImage(ctx.db, { pool: POOL, name, source: `/src/${name}`, format: "layer-family" });
  markImageReady(ctx.db, i.id, { format: "layer-family", config: null, layerIds: layers.map((l) => l.id), topChainId: null });
  return i.id;
}

describe("remove", () => {
  test("releases only the layers no other image uses; gone from list; a repeat is a no-op; its active snapshot stays listed", async () => {
    const base = layer("base", null);
    const a = layer("a", base);
    const b = layer("b", base);
    const ia = image("web:1", [base, a]);
    image("web:2", [base, b]);
    const snap = insertSnapshot(ctx.db, { pool: POOL, imageId: ia, layerId: a.id, pid: process.pid, command: "activate" });
    updateSnapshot(ctx.db, snap.id, { state: "active", activated_at: Date.now() });

    const r = await removeImages(ctx, ["web:1"]);
    expect(r.images).toEqual([
      { id: ia, name: "web:1", state: "removed", skip_reason: null, released_layers: [{ id: a.id, chain_id: "sha256:a", thin_id: a.thinId }], shared_layers: 1, active_snapshots: 1 },
    ]);
    expect(getLayer(ctx.db, a.id)!.released_at).toBeNumber();
    expect(getLayer(ctx.db, base.id)!.released_at).toBeNull();
    const inv = await inventory(ctx.db, POOL, { probePool: false });
    expect(inv.images.map((i) => i.name)).toEqual(["web:2"]);
    expect(inv.snapshots.map((s) => [s.id, s.image, s.state])).toEqual([[snap.id, "web:1", "active"]]);

    const again = await removeImages(ctx, ["web:1", String(ia)]);
    expect(again.images.map((i) => [i.name, i.state, i.released_layers.length])).toEqual([["web:1", "already_removed", 0]]);
  });

  test("an unknown name fails before anything is removed, with a one-line error", async () => {
    image("keep", [layer("k", null)]);
    const err = await removeImages(ctx, ["keep", "nope"]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ThinimgError);
    expect((err as ThinimgError).message).toBe('no image "nope" in pool tp');
    expect(getImageByName(ctx.db, POOL, "keep")!.removed_at).toBeNull();
    expect(await removeImages(ctx, []).catch((e: ThinimgError) => e.kind)).toBe("usage");
  });

  test("an image being unpacked (its lock held by a live process) is refused after --wait; nothing changes", async () => {
    const ia = image("busy", [layer("x", null)]);
    const me = currentHolder("bun scripts/unpack.ts busy");
    putLockRow(ctx.db, { key: `image:${POOL}:busy`, pid: me.pid, start_time: me.startTime, host: me.host, command: me.command, acquired_at: me.acquiredAt });
    const err = (await removeImages(ctx, ["busy"]).catch((e: unknown) => e)) as ThinimgError;
    expect(err.kind).toBe("conflict");
    expect(err.message).toContain("image busy is locked by pid");
    expect(getImageByName(ctx.db, POOL, "busy")!.removed_at).toBeNull();
    ctx.db.query("DELETE FROM locks").run();
    expect((await removeImages(ctx, ["busy"])).images[0]!.state).toBe("removed");
    expect(getImageByName(ctx.db, POOL, "busy")!.id).toBe(ia);
  });

  test("the same name unpacked again comes back as a normal image (same row), its layers no longer released", async () => {
    const l = layer("base", null);
    image("app", [l]);
    await removeImages(ctx, ["app"]);
    const again = beginImage(ctx.db, { pool: POOL, name: "app", source: "/src/app2", format: "oci" });
    expect([again.state, again.removed_at, again.source]).toEqual(["unpacking", null, "/src/app2"]);
    markImageReady(ctx.db, again.id, { format: "oci", config: null, layerIds: [l.id], topChainId: null });
    expect(getLayer(ctx.db, l.id)!.released_at).toBeNull();
    expect((await inventory(ctx.db, POOL, { probePool: false })).images.map((i) => [i.name, i.state])).toEqual([["app", "ready"]]);
  });
});

describe("GC's claim on a released layer", () => {
  const orphan = (thinId: number): Orphan => ({
    thinId,
    device: null,
    unmount: [],
    deleteThin: true,
    reason: "unreferenced_layer",
    detail: "",
    ageMs: 0,
    mappedBytes: null,
    witness: actionWitness(readGcRows(ctx.db, POOL), thinId, null),
  });

  test("still unreferenced: the layer row lets go of the id (starts afresh), the id is deleting; an abort leaves it orphaned", async () => {
    const l = layer("base", null);
    image("app", [l]);
    await removeImages(ctx, ["app"]);
    const led = storeLedger(ctx.db, POOL, { alive });
    expect(led.claim(orphan(l.thinId))).toBeNull();
    const row = getLayer(ctx.db, l.id)!;
    expect([row.thin_id, row.state, row.phase, row.released_at]).toEqual([null, "building", "new", null]);
    expect(getThinId(ctx.db, POOL, l.thinId)?.state).toBe("deleting");
    led.thinDeleteAborted(l.thinId, "busy");
    expect(getThinId(ctx.db, POOL, l.thinId)?.state).toBe("orphaned");
  });

  test("another image took the layer up after the plan: refused, nothing written", async () => {
    const l = layer("base", null);
    image("app", [l]);
    await removeImages(ctx, ["app"]);
    const a = orphan(l.thinId);
    image("other", [l]); // an unpack reused the committed layer meanwhile (touches no layer row but released_at)
    expect(storeLedger(ctx.db, POOL, { alive }).claim(a)).toMatch(/changed since the scan|referenced again/);
    expect(getLayer(ctx.db, l.id)!.state).toBe("committed");
    expect(getThinId(ctx.db, POOL, l.thinId)?.state).toBe("committed");
  });

  test("an unpack started after the plan (a live image lock): refused as locked", async () => {
    const l = layer("base", null);
    image("app", [l]);
    await removeImages(ctx, ["app"]);
    const a = orphan(l.thinId);
    const me = currentHolder("bun scripts/unpack.ts x");
    putLockRow(ctx.db, { key: `image:${POOL}:x`, pid: me.pid, start_time: me.startTime, host: me.host, command: me.command, acquired_at: me.acquiredAt });
    expect(storeLedger(ctx.db, POOL, { alive }).claim(a)).toContain(`image:${POOL}:x held by pid ${process.pid}`);
    expect(getLayer(ctx.db, l.id)!.state).toBe("committed");
  });
});
