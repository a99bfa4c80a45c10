// Host-wide safety on the real kernel, with several thinimg processes at once: the host dm queue
// (no two state-changing commands overlap, proved from the command records), the state dir's
// reader-writer contract (gc --force refuses while an unpack is mid-apply, naming it), ten
// processes asking for the same image (one build, ten answers), and an umount or mkfs that times out
// (no second command to that device; GC removes it later). Each test stands alone.
// vm-seconds: 140 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { journalPath } from "../../lib/cmd-journal.ts";
import { dmsetup, mount } from "../../lib/dm/index.ts";
import { run, runOk } from "../../lib/exec.ts";
import type { GcReport } from "../../lib/gc/report.ts";
import { isStateChanging } from "../../lib/lock/host-queue.ts";
import { openDb } from "../../lib/store/db.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { sampleLayer, writeLayerFamily } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeTestPool, type TestPool } from "../helpers/pool.ts";

requireDm();
setDefaultTimeout(300_000);

let p: TestPool;
let work: string;
const dirs: string[] = [];

beforeAll(async () => {
  p = await makeTestPool({ dataSize: "768M", metaSize: "16M" });
  work = mkdtempSync("/tmp/thinimg-hs-work-");
});

afterAll(async () => {
  for (const d of dirs) for (const m of mount.mountinfo().filter((e) => e.mountPoint.startsWith(d))) await run(["umount", m.mountPoint]);
  await p?.destroy();
  for (const d of [work, ...dirs]) if (d) rmSync(d, { recursive: true, force: true });
});

/** A fresh state dir (each test its own), its kernel-log cursor primed. */
async function freshState(): Promise<string> {
  const d = mkdtempSync("/tmp/thinimg-hs-state-");
  dirs.push(d);
  await primeKernelLogCursor(d);
  return d;
}

let famN = 0;
/** An image directory with `layers` sample layers (a 1 MiB file in each, so applying takes a while). */
function family(layers: number): string {
  const dir = join(work, `img${++famN}`);
  const base = 100 * famN;
  writeLayerFamily(
    dir,
    Array.from({ length: layers }, (_, i) => sampleLayer(base + i, [{ path: `data/${i}.bin`, content: String(i).repeat(1024 * 1024) }])),
  );
  return dir;
}

function spawnScript(state: string, script: string, args: string[], env: Record<string, string> = {}) {
  return Bun.spawn(["bun", `scripts/${script}.ts`, ...args, "--pool", p.name, "--state-dir", state], {
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, THINIMG_VIRTUAL_SIZE: "256M", ...env },
  });
}

async function finished(proc: ReturnType<typeof spawnScript>) {
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { code, out, err };
}

const jsonLines = (text: string) =>
  text
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>);

describe("one state-changing command at a time, from any number of processes", () => {
  test("two unpacks of different images and an activate, three processes: no two state-changing commands overlap", async () => {
    const state = await freshState();
    const cmdLog = join(work, "cmds.jsonl");
    const live = family(1);
    expect((await finished(spawnScript(state, "unpack", [live, "--name", "live"]))).code).toBe(0);
    writeFileSync(cmdLog, "");
    const env = { THINIMG_CMD_LOG: cmdLog };
    const procs = [
      spawnScript(state, "unpack", [family(3), "--name", "a", "--json"], env),
      spawnScript(state, "unpack", [family(3), "--name", "b", "--json"], env),
      spawnScript(state, "activate", ["live", "--json"], env),
    ];
    const results = await Promise.all(procs.map(finished));
    for (const r of results) expect({ code: r.code, err: r.code ? r.err : "" }).toEqual({ code: 0, err: "" });

    const recs = jsonLines(readFileSync(cmdLog, "utf8")).filter((r) => r.event === "cmd" && isStateChanging(String(r.command).split(" ")));
    // both unpacks built three layers (create, mkfs for the base, mount, umount, remove…), the activation its snapshot
    expect(recs.length).toBeGreaterThanOrEqual(2 * 3 * 4 + 1);
    const spans = recs
      .map((r) => ({ cmd: String(r.command), start: Date.parse(String(r.started_at)), end: Date.parse(String(r.started_at)) + Number(r.duration_ms) }))
      .sort((x, y) => x.start - y.start);
    const overlapping = spans.slice(1).flatMap((s, i) => (s.start < spans[i]!.end - 2 ? [[spans[i], s]] : [])); // 2 ms: both ends are rounded
    // the state dir's journal, written by all three processes, alternates strictly: each state-changing
    // command's before-record is followed by its own after-record before the next one starts
    const journal = jsonLines(readFileSync(journalPath(state), "utf8"));
    const sequence = journal.map((r) => `${r.event} ${r.command}`);
    const pairs: string[] = [];
    for (let i = 0; i < sequence.length; i += 2) pairs.push(`${sequence[i]} | ${sequence[i + 1]}`);
    const broken = pairs.filter((pr) => {
      const [b, a] = pr.split(" | ");
      return !b!.startsWith("cmd_start ") || a !== `cmd ${b!.slice("cmd_start ".length)}`;
    });
    expect({ overlapping, broken }).toEqual({ overlapping: [], broken: [] });
    expect(pairs.length).toBeGreaterThanOrEqual(recs.length);
    // and the work overlapped: the unpacks ran side by side, not one after the other
    const [ua, ub] = results.slice(0, 2).map((r) => JSON.parse(r.out) as { duration_ms: number });
    const wall = spans.at(-1)!.end - spans[0]!.start;
    expect(wall).toBeLessThan(ua!.duration_ms + ub!.duration_ms);
  });
});

describe("the state dir's reader-writer contract", () => {
  test("gc --force --wait 0 while an unpack is mid-apply: refused naming the unpack, nothing removed; the unpack then completes", async () => {
    const state = await freshState();
    const src = family(2);
    const flag = join(work, `paused-${Date.now()}`);
    const contFile = join(work, `continue-${Date.now()}`);
    const unpack = spawnScript(state, "unpack", [src, "--name", "mid", "--json"], {
      THINIMG_TEST_PAUSE_AT: "layer:mounted",
      THINIMG_TEST_PAUSE_FILE: flag,
      THINIMG_TEST_PAUSE_CONTINUE: contFile,
    });
    for (let i = 0; i < 1200 && !existsSync(flag); i++) await Bun.sleep(100);
    expect(readFileSync(flag, "utf8")).toStartWith("layer:mounted");
    const ids = await p.thinIds();
    const mounts = mount
      .mountinfo()
      .filter((m) => m.mountPoint.startsWith(state))
      .map((m) => m.mountPoint);
    expect(mounts.length).toBe(1);

    const g = await finished(spawnScript(state, "gc", ["--force", "--wait", "0", "--grace", "0", "--json"]));
    const r = JSON.parse(g.out) as GcReport;
    expect(g.code).toBe(1);
    expect(r.refused?.reason).toBe("lock_held");
    expect(r.refused?.detail).toContain(`pid ${unpack.pid} (bun scripts/unpack.ts`);
    expect(r.refused?.detail).not.toContain("\n");
    expect(await p.thinIds()).toEqual(ids);
    expect(
      mount
        .mountinfo()
        .filter((m) => m.mountPoint.startsWith(state))
        .map((m) => m.mountPoint),
    ).toEqual(mounts);

    writeFileSync(contFile, "go\n");
    const u = await finished(unpack);
    expect(u.code).toBe(0);
    expect((JSON.parse(u.out) as { layers: unknown[] }).layers.length).toBe(2);
    // with nobody holding the state dir, gc --force acts
    const g2 = await finished(spawnScript(state, "gc", ["--force", "--wait", "0", "--grace", "0", "--json"]));
    expect((JSON.parse(g2.out) as GcReport).lock.status).toBe("acquired");
  });
});

describe("many processes asking for the same image", () => {
  test("ten unpacks of one image at once: one build, ten identical answers", async () => {
    const state = await freshState();
    const src = family(2);
    const procs = Array.from({ length: 10 }, () => spawnScript(state, "unpack", [src, "--name", "same", "--json"]));
    const results = await Promise.all(procs.map(finished));
    for (const r of results) expect({ code: r.code, err: r.code ? r.err : "" }).toEqual({ code: 0, err: "" });
    const answers = results.map(
      (r) => JSON.parse(r.out) as { dm_work: boolean; built: number; layers: { thin_id: number; device_name: string; chain_id: string }[] },
    );
    expect(answers.filter((a) => a.dm_work).length).toBe(1);
    expect(answers.reduce((n, a) => n + a.built, 0)).toBe(2);
    const layers = JSON.stringify(answers[0]!.layers.map((l) => [l.chain_id, l.thin_id, l.device_name]));
    for (const a of answers) expect(JSON.stringify(a.layers.map((l) => [l.chain_id, l.thin_id, l.device_name]))).toBe(layers);
    // and the image really is what was asked for
    const act = await finished(spawnScript(state, "activate", ["same", "--json"]));
    expect(act.code).toBe(0);
    const dev = (JSON.parse(act.out) as { device_path: string }).device_path;
    const m = mkdtempSync("/tmp/thinimg-hs-ro-");
    dirs.push(m);
    await mount.mount(dev, m, { readOnly: true });
    try {
      expect(readFileSync(join(m, "data/1.bin"), "utf8")).toBe("1".repeat(1024 * 1024));
    } finally {
      await mount.umount(m);
    }
  });
});

describe("no retry after a timeout", () => {
  // the layer's device stops answering (suspended, so its I/O queues for ever: what a wedged disk
  // looks like) right before the command: it times out, and must be the last one sent to that device
  const cases: { tool: string; pause: string; env: Record<string, string>; isIt: (command: string, dev: string, mountPath: string) => boolean }[] = [
    { tool: "umount", pause: "layer:applied", env: { THINIMG_TIMEOUT_UMOUNT: "2s" }, isIt: (c: string, _dev: string, mnt: string) => c === `umount ${mnt}` },
    {
      tool: "mkfs.ext4",
      pause: "layer:activated",
      env: { THINIMG_TIMEOUT_MKFS: "2s" },
      isIt: (c: string, dev: string) => c.startsWith("mkfs.ext4 ") && c.endsWith(`/dev/mapper/${dev}`),
    },
  ];
  for (const k of cases) {
    test(`${k.tool} times out: no second command to that device or its mount in that run; recorded leaked; GC removes it later`, async () => {
      const state = await freshState();
      const cmdLog = join(work, `timeout-${k.tool}.jsonl`);
      writeFileSync(cmdLog, "");
      const flag = join(work, `paused-${k.tool}-${Date.now()}`);
      const contFile = join(work, `continue-${k.tool}-${Date.now()}`);
      const unpack = spawnScript(state, "unpack", [family(1), "--name", "stuck"], {
        ...k.env,
        THINIMG_CMD_LOG: cmdLog,
        THINIMG_TEST_PAUSE_AT: k.pause,
        THINIMG_TEST_PAUSE_FILE: flag,
        THINIMG_TEST_PAUSE_CONTINUE: contFile,
      });
      for (let i = 0; i < 1200 && !existsSync(flag); i++) await Bun.sleep(100);
      expect(readFileSync(flag, "utf8")).toStartWith(k.pause);
      const db = openDb(join(state, "state.db"), { readOnly: true });
      const layer = db.query("SELECT device_name, thin_id FROM layers WHERE state = 'building'").get() as { device_name: string; thin_id: number };
      db.close();
      const dev = layer.device_name;
      const mountPath = join(state, "mnt", dev);
      await runOk(["dmsetup", "suspend", "--nolockfs", dev]);
      let resumed = false;
      try {
        writeFileSync(contFile, "go\n");
        const u = await finished(unpack);
        expect(u.code).not.toBe(0);
        expect(u.err).toContain("timed out");
        expect(u.err).toContain("bun scripts/gc.ts --force");
        const recs = jsonLines(readFileSync(cmdLog, "utf8")).filter((r) => r.event === "cmd");
        const i = recs.findIndex((r) => k.isIt(String(r.command), dev, mountPath));
        expect(recs[i]).toMatchObject({ timed_out: true, device_name: dev });
        // nothing after it touched that device or its mount: no retry, no remove
        const later = recs.slice(i + 1).filter((r) => r.device_name === dev || String(r.command).includes(dev) || String(r.command).includes(mountPath));
        expect(later).toEqual([]);
        expect(recs.filter((r) => String(r.command).startsWith(`${k.tool} `))).toHaveLength(1);
        // recorded for GC
        const db2 = openDb(join(state, "state.db"), { readOnly: true });
        expect(db2.query("SELECT state FROM devices WHERE name = ?").get(dev)).toEqual({ state: "leaked" });
        db2.close();
        // the disk comes back: the command still in the kernel finishes by itself
        await runOk(["dmsetup", "resume", dev]);
        resumed = true;
        const busy = async () => mount.mountinfo().some((m) => m.mountPoint === mountPath) || ((await dmsetup.info(dev))?.open ?? 0) > 0;
        for (let n = 0; n < 300 && (await busy()); n++) await Bun.sleep(100);
        expect(await busy()).toBe(false);
      } finally {
        if (!resumed) await run(["dmsetup", "resume", dev]);
      }
      // later, on a healthy host, GC removes it
      const g = await finished(spawnScript(state, "gc", ["--force", "--wait", "0", "--grace", "0", "--json"]));
      expect({ code: g.code, err: g.code ? g.err : "" }).toEqual({ code: 0, err: "" });
      expect(await dmsetup.info(dev)).toBeNull();
      expect(await p.thinIds()).not.toContain(layer.thin_id);
    });
  }
});
