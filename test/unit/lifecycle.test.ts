// Removing and pruning images on a real SQLite file (remove is DB-only: no dm work): idempotence, unknown names,
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
import { inventory } from "../../lib/pipeline/inventory.ts";
import { prune, pruneGroup, selectPrune } from "../../lib/pipeline/prune.ts";
import { removeImageRows, removeImages } from "../../lib/pipeline/remove.ts";
import { exclusiveBlocks, layersFreedBy, parseThinDumpBlocks } from "../../lib/pipeline/space.ts";
import { type Ctx, makeCtx } from "../../lib/pool/context.ts";
import { actionWitness, readGcRows } from "../../lib/store/gc-queries.ts";
import { beginImage, getImageByName, markImageReady } from "../../lib/store/images.ts";
import { getLayer } from "../../lib/store/layers.ts";
import type { ImageUse } from "../../lib/store/lifecycle.ts";
import { putLockRow } from "../../lib/store/locks.ts";
import { insertSnapshot, updateSnapshot } from "../../lib/store/snapshots.ts";
import { getThinId } from "../../lib/store/thin-ids.ts";
import { makeImage, makeLayer } from "../helpers/store.ts";

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

const layer = (chain: string, parent: { id: number } | null) => makeLayer(ctx.db, POOL, chain, parent);
const image = (name: string, layers: { id: number }[]) => makeImage(ctx.db, POOL, name, layers);

describe("remove", () => {
  test("releases only the layers no other image uses; gone from list; a repeat is a no-op; its active snapshot stays listed", async () => {
    const base = layer("base", null);
    const a = layer("a", base);
    const b = layer("b", base);
    const ia = image("web:1", [base, a]);
    image("web:2", [base, b]);
    const snap = insertSnapshot(ctx.db, { pool: POOL, imageId: ia, layerId: a.id, virtualSize: 1 << 30, pid: process.pid, command: "activate" });
    updateSnapshot(ctx.db, snap.id, { state: "active", activated_at: Date.now() });

    const r = await removeImages(ctx, ["web:1"]);
    expect(r.images).toEqual([
      {
        id: ia,
        name: "web:1",
        state: "removed",
        skip_reason: null,
        released_layers: [{ id: a.id, chain_id: "sha256:a", thin_id: a.thinId }],
        shared_layers: 1,
        active_snapshots: 1,
      },
    ]);
    expect(getLayer(ctx.db, a.id)!.released_at).toBeNumber();
    expect(getLayer(ctx.db, base.id)!.released_at).toBeNull();
    const inv = await inventory(ctx.db, POOL, { probePool: false });
    expect(inv.images.map((i) => i.name)).toEqual(["web:2"]);
    expect(inv.snapshots.map((s) => [s.id, s.image, s.state])).toEqual([[snap.id, "web:1", "active"]]);

    const again = await removeImages(ctx, ["web:1", String(ia)]);
    expect(again.images.map((i) => [i.name, i.state, i.released_layers.length])).toEqual([["web:1", "already_removed", 0]]);
  });

  test("a guard (prune's re-check under the lock) that says no: skipped with its reason, nothing changes", async () => {
    const id = image("g", [layer("g", null)]);
    const img = getImageByName(ctx.db, POOL, "g")!;
    const r = await removeImageRows(ctx, [img], { guard: (i) => (i.id === id ? "kept: in_use (changed since the selection)" : null) });
    expect(r.images.map((i) => [i.state, i.skip_reason])).toEqual([["skipped", "kept: in_use (changed since the selection)"]]);
    expect(getImageByName(ctx.db, POOL, "g")!.removed_at).toBeNull();
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

describe("refresh", () => {
  test("a refresh that swaps an image's layers releases the old ones nobody else uses (a new version every deploy)", () => {
    const base = layer("base", null);
    const v1 = layer("v1", base);
    const v2 = layer("v2", base);
    const id = image("app", [base, v1]);
    image("other", [base]);
    markImageReady(ctx.db, id, { format: "layer-family", config: null, layerIds: [base.id, v2.id], topChainId: null });
    expect([getLayer(ctx.db, v1.id)!.released_at, getLayer(ctx.db, base.id)!.released_at, getLayer(ctx.db, v2.id)!.released_at]).toEqual([
      expect.any(Number),
      null,
      null,
    ]);
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

describe("prune selection (fake clock)", () => {
  const DAY = 86_400_000;
  const NOW = Date.UTC(2026, 11, 5);
  const use = (id: number, name: string, o: { readyDaysAgo: number; activatedDaysAgo?: number; active?: number; state?: string }): ImageUse => ({
    image: {
      id,
      pool: POOL,
      name,
      source: "/s",
      format: null,
      top_chain_id: null,
      top_layer_id: null,
      config: null,
      state: (o.state ?? "ready") as "ready",
      error: null,
      error_kind: null,
      created_at: NOW - o.readyDaysAgo * DAY,
      updated_at: NOW - o.readyDaysAgo * DAY,
      ready_at: NOW - o.readyDaysAgo * DAY,
      removed_at: null,
    },
    layerIds: [],
    activeSnapshots: o.active ?? 0,
    lastActivatedAt: o.activatedDaysAgo === undefined ? null : NOW - o.activatedDaysAgo * DAY,
  });

  test("name groups: the last :tag, else a -<version> suffix, else the whole name", () => {
    expect(["web:42", "registry:5000/web:1", "web-2026.12.01", "web-v3", "web-42", "my-app", "app", "a-b-7"].map(pruneGroup)).toEqual([
      "web",
      "registry:5000/web",
      "web",
      "web",
      "web",
      "my-app",
      "app",
      "a-b",
    ]);
  });

  test("--unused-for: last activation, or the unpack time when never activated; an active snapshot always keeps it", () => {
    const uses = [
      use(1, "old-never", { readyDaysAgo: 30 }),
      use(2, "old-but-used", { readyDaysAgo: 30, activatedDaysAgo: 1 }),
      use(3, "old-activated", { readyDaysAgo: 30, activatedDaysAgo: 10 }),
      use(4, "new", { readyDaysAgo: 2 }),
      use(5, "running", { readyDaysAgo: 30, activatedDaysAgo: 20, active: 1 }),
      use(6, "half", { readyDaysAgo: 30, state: "unpacking" }),
    ];
    const r = selectPrune(uses, { unusedForMs: 7 * DAY, keepLast: null }, NOW);
    expect(r.prune.map((p) => p.name)).toEqual(["old-never", "old-activated"]);
    expect(r.kept.map((k) => [k.name, k.keep_reason])).toEqual([
      ["old-but-used", "recently_used"],
      ["new", "recently_used"],
      ["running", "in_use"],
      ["half", "not_ready"],
    ]);
    expect(r.prune[1]!.last_used_at).toBe(new Date(NOW - 10 * DAY).toISOString());
    // a day later the one used yesterday is still recent; 7 days later it goes too
    expect(selectPrune(uses, { unusedForMs: 7 * DAY, keepLast: null }, NOW + 7 * DAY).prune.map((p) => p.name)).toEqual([
      "old-never",
      "old-but-used",
      "old-activated",
      "new",
    ]);
  });

  test("--keep-last N keeps the newest N per group (by unpack time), combined with --unused-for", () => {
    const uses = [
      use(1, "web:1", { readyDaysAgo: 30 }),
      use(2, "web:2", { readyDaysAgo: 20 }),
      use(3, "web:3", { readyDaysAgo: 10 }),
      use(4, "db:1", { readyDaysAgo: 40 }),
    ];
    expect(selectPrune(uses, { unusedForMs: null, keepLast: 1 }, NOW).prune.map((p) => p.name)).toEqual(["web:1", "web:2"]);
    expect(selectPrune(uses, { unusedForMs: null, keepLast: 2 }, NOW).prune.map((p) => p.name)).toEqual(["web:1"]);
    expect(selectPrune(uses, { unusedForMs: 15 * DAY, keepLast: 0 }, NOW).prune.map((p) => p.name)).toEqual(["web:1", "web:2", "db:1"]);
  });

  test("prune() on the DB with an injected clock: dry-run changes nothing; the real run removes and releases", async () => {
    const base = layer("base", null);
    const old = layer("old", base);
    const oldId = image("svc:1", [base, old]);
    image("svc:2", [base, layer("new", base)]);
    const later = Date.now() + 30 * 86_400_000;
    expect(await prune(ctx, { unusedForMs: null, keepLast: null, dryRun: true }).catch((e: ThinimgError) => e.kind)).toBe("usage");
    const dry = await prune(ctx, { unusedForMs: 7 * 86_400_000, keepLast: 1, dryRun: true, now: () => later, space: false });
    expect([dry.prune.map((p) => p.name), dry.kept.map((k) => [k.name, k.keep_reason]), dry.removed]).toEqual([["svc:1"], [["svc:2", "newest_of_group"]], []]);
    expect(getImageByName(ctx.db, POOL, "svc:1")!.removed_at).toBeNull();
    const real = await prune(ctx, { unusedForMs: 7 * 86_400_000, keepLast: 1, dryRun: false, now: () => later, space: false });
    expect(real.removed.map((r) => [r.id, r.state, r.released_layers.map((l) => l.id)])).toEqual([[oldId, "removed", [old.id]]]);
    // with the real clock nothing is old enough
    expect((await prune(ctx, { unusedForMs: 7 * 86_400_000, keepLast: null, dryRun: true, space: false })).prune).toEqual([]);
  });
});

describe("space GC frees", () => {
  const xml = `<superblock uuid="" time="3" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="8192">
  <device dev_id="1" mapped_blocks="10" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="14" transaction="1" creation_time="1" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="8" time="0"/>
    <range_mapping origin_begin="8" data_begin="10" length="5" time="1"/>
    <single_mapping origin_block="20" data_block="30" time="1"/>
  </device>
  <device dev_id="3" mapped_blocks="15" transaction="2" creation_time="2" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="8" time="0"/>
    <range_mapping origin_begin="8" data_begin="10" length="5" time="1"/>
    <range_mapping origin_begin="13" data_begin="40" length="2" time="2"/>
  </device>
</superblock>`;

  test("thin_dump ranges per device; freed = blocks only the freed ids map (shared between them counts once)", () => {
    const m = parseThinDumpBlocks(xml);
    expect(m.blockBytes).toBe(65536);
    expect(m.byThin.get(2)).toEqual([
      [0, 8],
      [10, 15],
      [30, 31],
    ]);
    // 2 and 3 share [10,15): exclusive to neither, but freed when both go
    expect(exclusiveBlocks(m, [3], [1, 2])).toBe(2);
    expect(exclusiveBlocks(m, [2, 3], [1])).toBe(5 + 1 + 2);
    expect(exclusiveBlocks(m, [1, 2, 3], [])).toBe(10 + 5 + 1 + 2);
    expect(exclusiveBlocks(m, [], [1])).toBe(0);
  });

  test("which layers a removal frees: its own, not the shared base", () => {
    const base = layer("base", null);
    const a = layer("a", base);
    const ia = image("a", [base, a]);
    image("b", [base, layer("b", base)]);
    const rows = readGcRows(ctx.db, POOL);
    expect([...layersFreedBy(POOL, rows, new Set([ia]), Date.now())]).toEqual([a.thinId]);
  });
});
