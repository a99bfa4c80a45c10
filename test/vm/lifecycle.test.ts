// The image lifecycle on a real pool, through the scripts as an operator runs them: two images
// sharing layers, `remove` one, `gc --force` frees exactly its own layers' blocks (pool data use back
// to the one-image figure) while the other still unpacks (a no-op) and activates with its files; an
// active snapshot of a removed image keeps working; remove waits for an unpack of the same image;
// a GC killed between remove and its act leaves what the next run finishes; the removed image
// unpacks again; list's exclusive space and prune's estimate (fake clock) equal what GC frees; a new
// version under the same name frees the old one's layer. Each test has its own pool and state dir.
// vm-seconds: 250 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { pool as dmpool, dmsetup, mount } from "../../lib/dm/index.ts";
import { parsePoolTable } from "../../lib/dm/pool.ts";
import { run } from "../../lib/exec.ts";
import type { GcReport } from "../../lib/gc/report.ts";
import { prune } from "../../lib/pipeline/prune.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { sampleLayer, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeTestPool, type TestPool } from "../helpers/pool.ts";

requireDm();
setDefaultTimeout(300_000);

interface Ran {
  code: number;
  out: string;
  err: string;
}

interface Env {
  p: TestPool;
  stateDir: string;
  work: string;
  /** Layer families: `a` and `b` share their two lower layers. */
  fam: { a: string; b: string };
}

const envs: Env[] = [];

const MiB = 1024 * 1024;
const blob = (c: string, mib: number) => c.repeat(mib * MiB);

async function fresh(): Promise<Env> {
  const p = await makeTestPool({ dataSize: "512M", metaSize: "16M" });
  const stateDir = mkdtempSync("/tmp/thinimg-life-state-");
  await primeKernelLogCursor(stateDir);
  const work = mkdtempSync("/tmp/thinimg-life-work-");
  const l1 = sampleLayer(1, [{ path: "one.bin", content: blob("1", 2) }]);
  const l2 = sampleLayer(2, [{ path: "two.bin", content: blob("2", 2) }]);
  const fam = { a: join(work, "a"), b: join(work, "b") };
  writeLayerFamily(fam.a, [l1, l2, sampleLayer(3, [{ path: "a.bin", content: blob("a", 3) }])]);
  writeLayerFamily(fam.b, [l1, l2, sampleLayer(4, [{ path: "b.bin", content: blob("b", 1) }])]);
  const e = { p, stateDir, work, fam };
  envs.push(e);
  return e;
}

afterEach(async () => {
  for (const e of envs.splice(0)) {
    for (const m of mount.mountinfo().filter((x) => x.mountPoint.startsWith(e.stateDir) || x.mountPoint.startsWith(e.work)))
      await run(["umount", m.mountPoint]);
    await e.p.destroy();
    rmSync(e.stateDir, { recursive: true, force: true });
    rmSync(e.work, { recursive: true, force: true });
  }
});

function spawnScript(e: Env, script: string, args: string[], env: Record<string, string> = {}) {
  return Bun.spawn(["bun", `scripts/${script}.ts`, ...args, "--pool", e.p.name, "--state-dir", e.stateDir], {
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, THINIMG_VIRTUAL_SIZE: "256M", ...env },
  });
}

async function finished(proc: ReturnType<typeof spawnScript>): Promise<Ran> {
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, out, err };
}

const script = (e: Env, name: string, args: string[], env: Record<string, string> = {}) => finished(spawnScript(e, name, args, env));

async function json<T = Record<string, unknown>>(e: Env, name: string, args: string[]): Promise<T> {
  const r = await script(e, name, [...args, "--json"]);
  if (r.code !== 0) throw new Error(`${name} ${args.join(" ")}: exit ${r.code}\n${r.out}\n${r.err}`);
  return JSON.parse(r.out) as T;
}

async function gc(e: Env, ...args: string[]): Promise<GcReport> {
  const r = await script(e, "gc", ["--json", ...args]);
  try {
    return JSON.parse(r.out) as GcReport;
  } catch {
    throw new Error(`gc ${args.join(" ")}: exit ${r.code}\n${r.out}\n${r.err}`);
  }
}

/** Start a script that pauses at `step` (test hook); cont() lets it carry on. */
async function paused(e: Env, name: string, args: string[], step: string) {
  const flag = join(e.work, `paused-${Date.now()}`);
  const contFile = join(e.work, `continue-${Date.now()}`);
  const proc = spawnScript(e, name, args, { THINIMG_TEST_PAUSE_AT: step, THINIMG_TEST_PAUSE_FILE: flag, THINIMG_TEST_PAUSE_CONTINUE: contFile });
  for (let i = 0; i < 1200 && !existsSync(flag); i++) {
    if (proc.exitCode !== null) throw new Error(`${name} exited ${proc.exitCode} before pausing at ${step}: ${await new Response(proc.stderr).text()}`);
    await Bun.sleep(100);
  }
  return { proc, cont: () => writeFileSync(contFile, "go\n") };
}

const dataUsed = async (e: Env) => (await dmpool.poolStatusOk(e.p.name)).dataUsed;

interface Unpacked {
  dm_work: boolean;
  built: number;
  layers: { thin_id: number; reused: boolean }[];
}
interface Removed {
  images: { name: string; state: string; released_layers: { id: number; thin_id: number }[]; shared_layers: number; active_snapshots: number }[];
}

/** Files of a device, through a read-only mount. */
async function files(e: Env, device: string, names: string[]): Promise<Record<string, string>> {
  const m = mkdtempSync(join(e.work, "ro-"));
  let mounted = false;
  try {
    await mount.mount(dmsetup.mapperPath(device), m, { readOnly: true });
    mounted = true;
    const out: Record<string, string> = {};
    for (const f of names) out[f] = existsSync(join(m, f)) ? readFileSync(join(m, f), "utf8").slice(0, 40) : "<missing>";
    await mount.umount(m);
    mounted = false;
    return out;
  } finally {
    if (mounted) await run(["umount", m]);
  }
}

const A_FILES = { top: "3\n", "layers/1": "layer 1\n", "layers/2": "layer 2\n", "layers/3": "layer 3\n", "a.bin": "a".repeat(40) };
const B_FILES = { top: "4\n", "layers/1": "layer 1\n", "layers/2": "layer 2\n", "layers/4": "layer 4\n", "b.bin": "b".repeat(40), "a.bin": "<missing>" };

describe("remove and gc", () => {
  test("two images sharing layers: removing one and gc --force frees exactly its own layers; the other is untouched", async () => {
    const e = await fresh();
    const empty = await dataUsed(e);
    const b = await json<Unpacked>(e, "unpack", [e.fam.b, "--name", "web:2"]);
    expect(b.built).toBe(3);
    const oneImage = await dataUsed(e);
    const a = await json<Unpacked>(e, "unpack", [e.fam.a, "--name", "web:1"]);
    expect(a.layers.map((l) => l.reused)).toEqual([true, true, false]);
    const twoImages = await dataUsed(e);
    expect(twoImages).toBeGreaterThan(oneImage);
    expect(oneImage).toBeGreaterThan(empty);

    const r = await json<Removed>(e, "remove", ["web:1"]);
    expect(r.images.map((i) => [i.name, i.state, i.released_layers.map((l) => l.thin_id), i.shared_layers])).toEqual([
      ["web:1", "removed", [a.layers[2]!.thin_id], 2],
    ]);
    const list = await json<{ images: { name: string }[] }>(e, "list", []);
    expect(list.images.map((i) => i.name)).toEqual(["web:2"]);
    expect(await dataUsed(e)).toBe(twoImages); // nothing happens to the pool before GC

    // the dry-run lists it (after the grace period only); --force deletes exactly that id
    expect((await gc(e)).orphans).toEqual([]);
    const dry = await gc(e, "--grace", "0");
    expect(dry.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[a.layers[2]!.thin_id, "unreferenced_layer", "would_remove"]]);
    const idsBefore = await e.p.thinIds();
    const forced = await gc(e, "--force", "--grace", "0");
    expect(forced.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[a.layers[2]!.thin_id, "unreferenced_layer", "done"]]);
    expect(await e.p.thinIds()).toEqual(idsBefore.filter((i) => i !== a.layers[2]!.thin_id));
    expect(await dataUsed(e)).toBe(oneImage);
    expect((await gc(e, "--force", "--grace", "0")).orphans).toEqual([]);

    // the other image: a re-run is a no-op, it activates with its own files
    const again = await json<Unpacked>(e, "unpack", [e.fam.b, "--name", "web:2"]);
    expect(again.dm_work).toBe(false);
    expect(again.layers.map((l) => l.thin_id)).toEqual(b.layers.map((l) => l.thin_id));
    const s = await json<{ device_name: string; snapshot_id: number }>(e, "activate", ["web:2"]);
    expect(await files(e, s.device_name, Object.keys(B_FILES))).toEqual(B_FILES);
    await json(e, "release", [String(s.snapshot_id)]);
    // removing it again is a no-op
    expect((await json<Removed>(e, "remove", ["web:1"])).images[0]!.state).toBe("already_removed");
  });

  test("an active snapshot of a removed image still mounts and reads its files, and stays listed until released", async () => {
    const e = await fresh();
    const empty = await dataUsed(e);
    await json(e, "unpack", [e.fam.a, "--name", "app"]);
    const s = await json<{ device_name: string; snapshot_id: number }>(e, "activate", ["app"]);
    const r = await json<Removed>(e, "remove", ["app"]);
    expect(r.images[0]!.released_layers.length).toBe(3);
    expect(r.images[0]!.active_snapshots).toBe(1);
    const forced = await gc(e, "--force", "--grace", "0");
    expect(forced.orphans.map((o) => [o.reason, o.outcome])).toEqual([
      ["unreferenced_layer", "done"],
      ["unreferenced_layer", "done"],
      ["unreferenced_layer", "done"],
    ]);
    // every layer is gone from the pool; the snapshot (a thin device of its own) is all that is left
    const snapThin = Number(s.device_name.split("-").at(-1));
    expect(await e.p.thinIds()).toEqual([snapThin]);
    expect(await files(e, s.device_name, Object.keys(A_FILES))).toEqual(A_FILES);
    const list = await json<{ images: unknown[]; snapshots: { id: number; image: string; state: string }[] }>(e, "list", []);
    expect(list.images).toEqual([]);
    expect(list.snapshots.map((x) => [x.id, x.image, x.state])).toEqual([[s.snapshot_id, "app", "active"]]);
    const act = await script(e, "activate", ["app"]);
    expect(act.code).not.toBe(0);
    expect(act.err).toContain("image app is failed");
    await json(e, "release", [String(s.snapshot_id)]);
    expect((await gc(e, "--force", "--grace", "0")).orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[snapThin, "db_released", "done"]]);
    expect(await e.p.thinIds()).toEqual([]);
    expect(await dataUsed(e)).toBe(empty);
  });

  test("remove waits for an unpack of the same image; a GC killed between remove and its act leaves what the next run finishes; the image unpacks again", async () => {
    const e = await fresh();
    await json(e, "unpack", [e.fam.b, "--name", "keep"]);
    const oneImage = await dataUsed(e);
    // an unpack of `app` holds its image lock (paused mid-way): remove refuses after --wait
    const u = await paused(e, "unpack", [e.fam.a, "--name", "app"], "layer:mounted");
    try {
      const refused = await script(e, "remove", ["app", "--wait", "0"]);
      expect(refused.code).not.toBe(0);
      expect(refused.err).toContain("image app is locked by pid");
      // with a longer --wait it waits for the unpack and then removes the finished image
      const waiting = spawnScript(e, "remove", ["app", "--wait", "2m", "--json"]);
      await Bun.sleep(1500);
      expect(waiting.exitCode).toBeNull();
      u.cont();
      expect((await finished(u.proc)).code).toBe(0);
      const rm = await finished(waiting);
      expect(rm.code).toBe(0);
      const r = JSON.parse(rm.out) as Removed;
      expect(r.images.map((i) => [i.state, i.released_layers.length])).toEqual([["removed", 1]]);
    } finally {
      u.proc.kill(9);
    }
    // gc --force dies between its plan and its act: nothing claimed, nothing deleted
    const g = await paused(e, "gc", ["--force", "--grace", "0", "--json"], "gc:planned");
    g.proc.kill(9);
    await g.proc.exited;
    expect(await dataUsed(e)).toBeGreaterThan(oneImage);
    const next = await gc(e, "--force", "--grace", "0");
    expect(next.orphans.map((o) => [o.reason, o.outcome])).toEqual([["unreferenced_layer", "done"]]);
    expect(await dataUsed(e)).toBe(oneImage);
    // unpacked again: the collected layer is built afresh, the shared ones reused; it activates
    const again = await json<Unpacked>(e, "unpack", [e.fam.a, "--name", "app"]);
    expect([again.dm_work, again.layers.map((l) => l.reused)]).toEqual([true, [true, true, false]]);
    const s = await json<{ device_name: string; snapshot_id: number }>(e, "activate", ["app"]);
    expect(await files(e, s.device_name, Object.keys(A_FILES))).toEqual(A_FILES);
    await json(e, "release", [String(s.snapshot_id)]);
    const listed = await json<{ images: { name: string; state: string }[] }>(e, "list", []);
    expect(listed.images.map((i) => [i.name, i.state])).toEqual([
      ["keep", "ready"],
      ["app", "ready"],
    ]);
  });

  test("list shows the space only each image holds; prune by age (fake clock) removes the unused one, and GC frees exactly that", async () => {
    const e = await fresh();
    await json(e, "unpack", [e.fam.b, "--name", "web:2"]);
    const oneImage = await dataUsed(e);
    await json(e, "unpack", [e.fam.a, "--name", "web:1"]);
    const twoImages = await dataUsed(e);
    const blockBytes = parsePoolTable((await dmsetup.table(e.p.name)).split("\n")[0]!).blockSectors * 512;
    const s = await json<{ device_name: string; snapshot_id: number }>(e, "activate", ["web:2"]);
    type Listed = {
      images: { name: string; exclusive_bytes: number | null; last_activated_at: string | null; active_snapshots: number }[];
      space_detail: string | null;
    };
    const list = await json<Listed>(e, "list", []);
    expect(list.space_detail).toBeNull();
    const byName = new Map(list.images.map((i) => [i.name, i]));
    // web:1's own layer is all it holds; web:2's top layer is shared with its active snapshot
    expect(byName.get("web:1")!.exclusive_bytes).toBe((twoImages - oneImage) * blockBytes);
    expect([byName.get("web:1")!.last_activated_at, byName.get("web:1")!.active_snapshots]).toEqual([null, 0]);
    expect(byName.get("web:2")!.last_activated_at).toBeString();
    expect(byName.get("web:2")!.active_snapshots).toBe(1);

    // the script with the real clock: nothing is a week old
    const none = await json<{ prune: unknown[]; freed_bytes: number }>(e, "prune", ["--unused-for", "7d"]);
    expect([none.prune, none.freed_bytes]).toEqual([[], 0]);
    // a fake clock: 3 days on nothing is old enough; 8 days on web:1 (never activated) is, web:2 is in use
    const ctx = makeCtx(loadConfig({ stateDir: e.stateDir, pool: e.p.name }), { command: "lifecycle test prune" });
    try {
      const day = 86_400_000;
      const soon = await prune(ctx, { unusedForMs: 7 * day, keepLast: null, dryRun: true, now: () => Date.now() + 3 * day });
      expect(soon.prune).toEqual([]);
      const dry = await prune(ctx, { unusedForMs: 7 * day, keepLast: null, dryRun: true, now: () => Date.now() + 8 * day });
      expect([dry.prune.map((p) => p.name), dry.kept.map((k) => [k.name, k.keep_reason])]).toEqual([["web:1"], [["web:2", "in_use"]]]);
      expect(dry.freed_bytes).toBe((twoImages - oneImage) * blockBytes);
      expect((await json<Listed>(e, "list", [])).images.length).toBe(2); // a dry-run changes nothing
      const real = await prune(ctx, { unusedForMs: 7 * day, keepLast: null, dryRun: false, now: () => Date.now() + 8 * day });
      expect(real.removed.map((r) => [r.name, r.state])).toEqual([["web:1", "removed"]]);
    } finally {
      ctx.db.close();
    }
    expect((await gc(e, "--force", "--grace", "0")).orphans.map((o) => [o.reason, o.outcome])).toEqual([["unreferenced_layer", "done"]]);
    expect(await dataUsed(e)).toBe(oneImage);
    expect(await files(e, s.device_name, Object.keys(B_FILES))).toEqual(B_FILES);
  });

  test("a new version unpacked under the same name: gc --force frees the old version's own layer", async () => {
    const e = await fresh();
    // deploy 1, then deploy 2 of `web` (a new source: layers 1-2 shared, the top one new)
    const v1 = await json<Unpacked>(e, "unpack", [e.fam.a, "--name", "web"]);
    const v2 = await json<Unpacked>(e, "unpack", [e.fam.b, "--name", "web"]);
    expect(v2.layers.map((l) => l.reused)).toEqual([true, true, false]);
    const before = await dataUsed(e);
    const ids = await e.p.thinIds();
    const forced = await gc(e, "--force", "--grace", "0");
    expect(forced.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[v1.layers[2]!.thin_id, "unreferenced_layer", "done"]]);
    expect(await e.p.thinIds()).toEqual(ids.filter((i) => i !== v1.layers[2]!.thin_id));
    expect(await dataUsed(e)).toBeLessThan(before);
    const s = await json<{ device_name: string; snapshot_id: number }>(e, "activate", ["web"]);
    expect(await files(e, s.device_name, Object.keys(B_FILES))).toEqual(B_FILES);
    await json(e, "release", [String(s.snapshot_id)]);
  });
});
