// Crash safety on the real kernel: an unpack (a real `bun scripts/unpack.ts` process) is killed -9
// at every step boundary, then the unpack is run again. The re-run must complete, the DB must agree
// with the pool (thin ids read from a metadata snapshot), nothing may be done twice (a pool change the
// transaction id proves happened is not repeated; an unproven one is never adopted), and anything
// the crash left behind is recorded as leaked for GC. "Reboot" cases also drop the mount and the
// device after the kill (what a host restart does), and a metadata snapshot left held by a killed
// process must not block the next run. Then: five processes asking for one image at once → one
// build, all five get it.
// vm-seconds: 280 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { poolStatusOk } from "../../lib/dm/pool.ts";
import { runOk } from "../../lib/exec.ts";
import { log } from "../../lib/log.ts";
import { activate, release } from "../../lib/pipeline/activate.ts";
import { checkConsistency } from "../../lib/pipeline/consistency.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { type Ctx, makeCtx } from "../../lib/pool/context.ts";
import { readPoolThinIds } from "../../lib/pool/journal.ts";
import { mountPathFor } from "../../lib/pool/names.ts";
import { getImageByName, imageLayerIds } from "../../lib/store/images.ts";
import { listLayers } from "../../lib/store/layers.ts";
import { listMounts } from "../../lib/store/mounts.ts";
import { listThinIds } from "../../lib/store/thin-ids.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { once } from "../helpers/once.ts";
import { makeTestPool, type TestPool, unmountUnder } from "../helpers/pool.ts";

requireDm();

const ROOT = join(import.meta.dir, "../..");
const W = mkdtempSync("/tmp/thinimg-crash-vm-");
// every command of every process in these tests (children inherit it), to prove nothing ran twice
const CMD_LOG = join(W, "cmds.jsonl");
process.env.THINIMG_CMD_LOG = CMD_LOG;
let pool: TestPool;
let ctx: Ctx;

beforeAll(async () => {
  pool = await makeTestPool({ dataSize: "1G" });
  // fault tests that ran earlier in this VM left kernel errors: start the dmesg cursor after them
  await primeKernelLogCursor(join(W, "state"));
  ctx = makeCtx(loadConfig({ stateDir: join(W, "state"), pool: pool.name, virtualSize: "128M", wait: "60s" }, {}), { command: "crash.test" });
}, 60_000);

afterAll(async () => {
  await unmountUnder(W);
  ctx?.db.close();
  await pool?.destroy();
  rmSync(W, { recursive: true, force: true });
}, 60_000);

/** A distinct 2-layer image per case (nothing shared between cases). */
function image(tag: string): string {
  const dir = join(W, "img", tag);
  const big = new Uint8Array(512 * 1024).map((_, i) => (i * 31 + tag.length) & 0xff);
  writeLayerFamily(dir, [
    buildLayerTar([
      { path: "etc/", type: "dir" },
      { path: "etc/case", content: `${tag}\n` },
      { path: "usr/lib/blob", content: big },
      { path: "gone", content: "removed by layer 2" },
    ]),
    buildLayerTar([{ path: "layer2", content: `${tag} layer 2\n` }, { path: ".wh.gone" }]),
  ]);
  return dir;
}

function env(extra: Record<string, string> = {}): Record<string, string> {
  return {
    ...(process.env as Record<string, string>),
    THINIMG_STATE_DIR: ctx.cfg.stateDir,
    THINIMG_POOL: ctx.cfg.pool,
    THINIMG_VIRTUAL_SIZE: "128M",
    ...extra,
  };
}

/** Start a real unpack process that pauses at `at`; resolve once it is there, then kill -9 it. */
async function crashAt(at: string, script: string[], tag: string): Promise<void> {
  const marker = join(W, `paused-${tag}`);
  const p = Bun.spawn(["bun", ...script], {
    cwd: ROOT,
    env: env({ THINIMG_TEST_PAUSE_AT: at, THINIMG_TEST_PAUSE_FILE: marker }),
    stdout: "pipe",
    stderr: "pipe",
  });
  const deadline = Date.now() + 90_000;
  while (!existsSync(marker)) {
    if (p.exitCode !== null || Date.now() > deadline) {
      p.kill(9);
      const err = await new Response(p.stderr).text();
      throw new Error(`process never paused at ${at} (exit ${p.exitCode}): ${err.slice(-2000)}`);
    }
    await Bun.sleep(50);
  }
  expect(readFileSync(marker, "utf8")).toStartWith(at);
  p.kill(9);
  await p.exited;
}

async function contentOf(name: string): Promise<{ caseFile: string; layer2: string; goneExists: boolean }> {
  const a = await activate(ctx, name);
  const dir = join(W, `m-${name}`);
  mkdirSync(dir, { recursive: true });
  await mnt.mount(a.device_path, dir, { readOnly: true, options: ["noload"] });
  try {
    return {
      caseFile: readFileSync(join(dir, "etc/case"), "utf8"),
      layer2: readFileSync(join(dir, "layer2"), "utf8"),
      goneExists: existsSync(join(dir, "gone")),
    };
  } finally {
    await runOk(["umount", dir]);
    await release(ctx, String(a.snapshot_id));
  }
}

// Boundary → what the crash is allowed to leave behind (recorded, for GC). Everything else must
// resume on the same thin id with no leak at all. reboot: after the kill, the mount and the device
// are dropped too (as a host restart does; the test does it, never product code).
const CASES: { at: string; reboot?: boolean; leaks: { thin: number; mounts: number } }[] = [
  { at: "create_thin:intent", leaks: { thin: 0, mounts: 0 } },
  // create ran, the transaction id was not advanced: unproven → never adopted, recorded orphaned
  { at: "create_thin:sent", leaks: { thin: 1, mounts: 0 } },
  // create ran and set_transaction_id too, the DB does not know: the transaction id proves it → adopted
  { at: "create_thin:txn", leaks: { thin: 0, mounts: 0 } },
  { at: "layer:allocated", leaks: { thin: 0, mounts: 0 } },
  { at: "layer:created", leaks: { thin: 0, mounts: 0 } },
  { at: "layer:activated", leaks: { thin: 0, mounts: 0 } },
  { at: "layer:formatted", leaks: { thin: 0, mounts: 0 } },
  // after a reboot the device is gone: re-activated on the same thin id (no second mkfs)
  { at: "layer:activated", reboot: true, leaks: { thin: 0, mounts: 0 } },
  { at: "layer:formatted", reboot: true, leaks: { thin: 0, mounts: 0 } },
  // half-applied layer: that attempt (thin id, active device, mount) is abandoned and recorded
  { at: "layer:mounted", leaks: { thin: 1, mounts: 1 } },
  { at: "layer:applied", leaks: { thin: 0, mounts: 0 } },
  // flushed, but the filesystem was never cleanly unmounted: that attempt is abandoned and recorded
  { at: "layer:applied", reboot: true, leaks: { thin: 1, mounts: 1 } },
  { at: "layer:unmounted", leaks: { thin: 0, mounts: 0 } },
  { at: "layer:deactivated", leaks: { thin: 0, mounts: 0 } },
  { at: "create_snap:intent", leaks: { thin: 0, mounts: 0 } },
  { at: "create_snap:sent", leaks: { thin: 1, mounts: 0 } },
  { at: "create_snap:txn", leaks: { thin: 0, mounts: 0 } },
];
const label = (c: (typeof CASES)[number]) => `${c.at}${c.reboot ? " +reboot" : ""}`;

/** What a host restart does to the layer being built: its mount and its dm device are gone. */
async function reboot(): Promise<void> {
  // the layer the killed process was building: the one it touched last
  const l = listLayers(ctx.db, ctx.cfg.pool)
    .filter((x) => x.state === "building" && x.device_name)
    .sort((a, b) => b.updated_at - a.updated_at)[0]!;
  const path = mountPathFor(ctx.cfg.mountDir, l.device_name!);
  if (mnt.mountinfo().some((m) => m.mountPoint === path)) await runOk(["umount", path]);
  expect(await dmsetup.exists(l.device_name!)).toBe(true);
  await runOk(["dmsetup", "remove", l.device_name!]);
}

/** Create messages in the command log: thin id → how many times a create of it was sent. */
function createsById(): Map<number, number> {
  const out = new Map<number, number>();
  for (const line of readFileSync(CMD_LOG, "utf8").trim().split("\n")) {
    const cmd = (JSON.parse(line) as { command: string }).command;
    const m = new RegExp(`^dmsetup (?:\\S+ )*message ${ctx.cfg.pool} 0 create_(?:thin|snap) (\\d+)(?: \\d+)?$`).exec(cmd);
    if (m) out.set(Number(m[1]), (out.get(Number(m[1])) ?? 0) + 1);
  }
  return out;
}

/** Leaks recorded against one image's layers: orphaned layer thin ids still in the pool, leaked mounts. */
function leaksOf(name: string, poolIds: Set<number>): { thin: number; mounts: number } {
  const img = getImageByName(ctx.db, ctx.cfg.pool, name)!;
  const layerIds = new Set(imageLayerIds(ctx.db, img.id));
  const thins = listThinIds(ctx.db, ctx.cfg.pool).filter(
    (t) => t.owner_kind === "layer" && layerIds.has(t.owner_id!) && t.state === "orphaned" && poolIds.has(t.thin_id),
  );
  const thinSet = new Set(thins.map((t) => t.thin_id));
  const mounts = listMounts(ctx.db, ctx.cfg.pool, ["leaked"]).filter((m) => thinSet.has(m.thin_id));
  return { thin: thins.length, mounts: mounts.length };
}

// One crash per boundary, each in its own image; every crash is settled by the NEXT process that
// touches the pool (the next crashing child, then the re-runs) — as on a real host. Both steps run
// once, when the first test that needs them asks (helpers/once.ts).
const crashes = once(async () => {
  for (const [i, c] of CASES.entries()) {
    await crashAt(c.at, ["scripts/unpack.ts", image(`c${i}`), "--name", `c${i}`], `c${i}`);
    if (c.reboot) await reboot();
  }
});
const reruns = once(async () => {
  await crashes();
  const out: { state: string; layers: number; devicesLeft: number }[] = [];
  for (const [i] of CASES.entries()) {
    const r = await unpack(ctx, { source: join(W, "img", `c${i}`), name: `c${i}` });
    let devicesLeft = 0;
    for (const l of r.layers) if (await dmsetup.exists(l.device_name)) devicesLeft++;
    out.push({ state: r.image.state, layers: r.layers.length, devicesLeft });
  }
  return out;
});

describe("kill -9 at every step boundary, then re-run", () => {
  test("crash each unpack at its boundary", async () => {
    await crashes();
  }, 600_000);

  test("re-runs complete every image; DB and pool agree; leaks exactly where expected", async () => {
    expect(await reruns()).toEqual(CASES.map(() => ({ state: "ready", layers: 2, devicesLeft: 0 })));
    const check = await checkConsistency(ctx);
    expect(check.problems).toEqual([]);
    const poolIds = new Set(check.pool_ids);
    expect(Object.fromEntries(CASES.map((c, i) => [label(c), leaksOf(`c${i}`, poolIds)]))).toEqual(Object.fromEntries(CASES.map((c) => [label(c), c.leaks])));
    // every layer built exactly once: two committed layers per image, no pending intent left
    expect(listLayers(ctx.db, ctx.cfg.pool).filter((l) => l.state === "committed")).toHaveLength(2 * CASES.length);
    // nothing done twice: across the killed processes and the re-runs no create message was sent
    // twice for one thin id (a repeat would fail with "File exists" or make a second device)…
    const creates = createsById();
    expect([...creates].filter(([, n]) => n > 1)).toEqual([]);
    // … and every id in the pool was created exactly once, by us
    for (const id of poolIds) expect(creates.get(id)).toBe(1);
  }, 600_000);

  test("every re-run image has exactly its files", async () => {
    await reruns();
    for (const [i] of CASES.entries()) {
      expect(await contentOf(`c${i}`)).toEqual({ caseFile: `c${i}\n`, layer2: `c${i} layer 2\n`, goneExists: false });
    }
  }, 600_000);

  test("an activation killed after its create_snap: the next activation works, the id is recorded for GC", async () => {
    await reruns();
    const thinBefore = listThinIds(ctx.db, ctx.cfg.pool).length;
    await crashAt("activate:created", ["scripts/activate.ts", "c0"], "act");
    const a = await activate(ctx, "c0"); // also settles the dead activation's intent
    expect(a.device_path).toStartWith("/dev/mapper/");
    await release(ctx, String(a.snapshot_id));
    const check = await checkConsistency(ctx);
    expect(check.problems).toEqual([]);
    const ids = listThinIds(ctx.db, ctx.cfg.pool);
    expect(ids.length).toBe(thinBefore + 2);
    const dead = ids.at(-2)!;
    expect(dead.state).toBe("orphaned");
    expect(dead.reason).toContain("activation interrupted");
  }, 180_000);
});

describe("a metadata snapshot left held", () => {
  function captureWarnings(): { lines: string[]; stop(): void } {
    const lines: string[] = [];
    const orig = log.warn.bind(log);
    log.warn = ((...a: unknown[]) => {
      lines.push(a.map((x) => (typeof x === "string" ? x : JSON.stringify(x))).join(" "));
      orig(...(a as Parameters<typeof log.warn>));
    }) as typeof log.warn;
    return {
      lines,
      stop: () => {
        log.warn = orig;
      },
    };
  }

  test("by a killed process: the next run releases it (with a warning) and completes", async () => {
    // the re-run must read the pool's metadata (an unproven create) while the stale hold is there
    await crashAt("create_thin:sent", ["scripts/unpack.ts", image("held"), "--name", "held"], "held");
    await runOk(["dmsetup", "message", ctx.cfg.pool, "0", "reserve_metadata_snap"]); // the holder "dies" now
    expect((await poolStatusOk(ctx.cfg.pool)).heldRoot).not.toBeNull();
    const w = captureWarnings();
    try {
      const r = await unpack(ctx, { source: join(W, "img", "held"), name: "held" });
      expect(r.image.state).toBe("ready");
    } finally {
      w.stop();
    }
    expect(w.lines.some((l) => l.includes("releasing a stale metadata snapshot"))).toBe(true);
    expect((await poolStatusOk(ctx.cfg.pool)).heldRoot).toBeNull();
    expect((await checkConsistency(ctx)).problems).toEqual([]);
  }, 180_000);

  test("by a live reader (a lock-free GC dry-run): waited for, never released under it", async () => {
    const P = ctx.cfg.pool;
    // reserve, hold 2 s, release: the holder's own release fails if anyone released it meanwhile
    const holder = Bun.spawn(
      ["sh", "-c", `dmsetup message ${P} 0 reserve_metadata_snap && echo held && sleep 2 && dmsetup message ${P} 0 release_metadata_snap`],
      {
        stdout: "pipe",
        stderr: "pipe",
        env: { ...process.env, DM_DISABLE_UDEV: "1" },
      },
    );
    const reader = holder.stdout.getReader();
    expect(new TextDecoder().decode((await reader.read()).value)).toContain("held");
    const w = captureWarnings();
    let ids: number[];
    try {
      ids = await readPoolThinIds(P, { stateDir: ctx.cfg.stateDir });
    } finally {
      w.stop();
    }
    expect(await holder.exited).toBe(0);
    expect(ids.length).toBeGreaterThan(0);
    expect(w.lines.filter((l) => l.includes("releasing a stale metadata snapshot"))).toEqual([]);
    expect((await poolStatusOk(P)).heldRoot).toBeNull();
  }, 60_000);
});

describe("concurrency", () => {
  test("five processes asking for one image → one build, all five get it", async () => {
    const src = image("five");
    const logs = Array.from({ length: 5 }, (_, i) => join(W, `cmds-${i}.jsonl`));
    const procs = logs.map((log) =>
      Bun.spawn(["bun", "scripts/unpack.ts", src, "--name", "five", "--json", "--wait", "5m"], {
        cwd: ROOT,
        env: env({ THINIMG_CMD_LOG: log }),
        stdout: "pipe",
        stderr: "pipe",
      }),
    );
    const outs = await Promise.all(
      procs.map(async (p) => ({ code: await p.exited, out: await new Response(p.stdout).text(), err: await new Response(p.stderr).text() })),
    );
    for (const o of outs) expect(o.code, o.err).toBe(0);
    const results = outs.map((o) => JSON.parse(o.out) as { dm_work: boolean; built: number; waited: boolean; layers: { thin_id: number }[] });
    expect(results.filter((r) => r.dm_work)).toHaveLength(1);
    expect(results.filter((r) => r.built > 0).map((r) => r.built)).toEqual([2]);
    // everyone got the same devices
    expect(new Set(results.map((r) => r.layers.map((l) => l.thin_id).join(","))).size).toBe(1);
    // across all five processes, each pool change happened exactly once
    const creates = logs
      .flatMap((l) => (existsSync(l) ? readFileSync(l, "utf8").trim().split("\n") : []))
      .filter((line) => / 0 create_(thin|snap) /.test(line));
    expect(creates).toHaveLength(2);
    expect(getImageByName(ctx.db, ctx.cfg.pool, "five")!.state).toBe("ready");
    expect((await checkConsistency(ctx)).problems).toEqual([]);
  }, 240_000);
});
