// The host-wide dm queue (lib/lock/host-queue.ts) across real processes: commands are answered by a fake
// runner inside each child (no kernel here), but the lock, the tickets, the waiting and the journal
// are the real ones. test/vm/host-safety.test.ts checks the same guarantees with real dm commands.
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { JOURNAL_KEEP, journal, journalPath, useCommandJournal } from "../../lib/cmd-journal.ts";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { type CmdResult, setRunner, spawnRunner } from "../../lib/exec.ts";
import { clearTimeouts, isStateChanging } from "../../lib/lock/host-queue.ts";
import { processStartTime } from "../../lib/lock/owner.ts";
import { readFlockRecord } from "../../lib/util/flock.ts";

const dir = mkdtempSync("/tmp/thinimg-host-queue-");
const lib = join(import.meta.dir, "../../lib");
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => {
  setRunner(spawnRunner);
  clearTimeouts();
  useCommandJournal(null);
});

let n = 0;
/** A fresh queue file per test, so tests never wait on each other. */
function freshQueue(): string {
  return join(dir, `q${++n}`, "dm-queue.lock");
}

/** Until the queue's holder has written who it is (a child's start is slow on a loaded host). */
async function heldBy(queue: string, command: string): Promise<void> {
  const until = Date.now() + 20_000;
  while (!(readFlockRecord(queue) ?? "").includes(command) && Date.now() < until) await Bun.sleep(10);
  expect(readFlockRecord(queue)).toContain(command);
}

/**
 * A child process that runs `cmds` (argv lists) through lib/exec.ts run(), each answered by a fake
 * runner that takes `ms`. Every command's start and end (wall clock) and the child's waiting messages
 * are printed as JSON lines.
 */
function child(queue: string, cmds: string[][], o: { ms?: number; env?: Record<string, string>; body?: string } = {}) {
  const script = `
    import { run, setRunner } from "${lib}/exec.ts";
    import { log } from "${lib}/log.ts";
    import * as dmsetup from "${lib}/dm/dmsetup.ts";
    log.info = (m) => console.log(JSON.stringify({ info: String(m) }));
    setRunner(async (argv) => {
      const start = Date.now();
      await Bun.sleep(${o.ms ?? 50});
      console.log(JSON.stringify({ pid: process.pid, cmd: argv.join(" "), start, end: Date.now() }));
      return { argv, stdout: "", stderr: "", exitCode: 0, signal: null, timedOut: false, durationMs: Date.now() - start };
    });
    try {
      ${o.body ?? `for (const c of ${JSON.stringify(cmds)}) await run(c);`}
    } catch (e) { console.log(JSON.stringify({ error: e.message })); }
  `;
  return Bun.spawn(["bun", "-e", script], { env: { ...process.env, THINIMG_DM_QUEUE: queue, ...o.env }, stdout: "pipe", stderr: "pipe" });
}

type Line = { pid?: number; cmd?: string; start?: number; end?: number; info?: string; error?: string };
async function lines(p: ReturnType<typeof child>): Promise<Line[]> {
  const out = await new Response(p.stdout).text();
  await p.exited;
  return out
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Line);
}

function overlaps(spans: Line[]): [Line, Line][] {
  const s = [...spans].sort((a, b) => a.start! - b.start!);
  const bad: [Line, Line][] = [];
  for (let i = 1; i < s.length; i++) if (s[i]!.start! < s[i - 1]!.end!) bad.push([s[i - 1]!, s[i]!]);
  return bad;
}

describe("which commands queue", () => {
  test("state-changing dm, loop, mkfs, mount, umount commands queue; reads and other tools don't", () => {
    const yes = [
      ["dmsetup", "--noudevsync", "create", "x", "--table", "0 8 zero"],
      ["dmsetup", "remove", "x"],
      ["dmsetup", "suspend", "x"],
      ["dmsetup", "resume", "x"],
      ["dmsetup", "reload", "x", "--table", "t"],
      ["dmsetup", "message", "pool", "0", "create_thin 1"],
      ["losetup", "--find", "--show", "/f"],
      ["losetup", "--detach", "/dev/loop0"],
      ["losetup", "-c", "/dev/loop0"],
      ["mkfs.ext4", "-q", "/dev/mapper/x"],
      ["mount", "-t", "ext4", "/dev/mapper/x", "/m"],
      ["umount", "/m"],
      ["e2fsck", "-f", "-p", "/dev/mapper/x"],
      ["resize2fs", "/dev/mapper/x"],
    ];
    const no = [
      ["dmsetup", "--noudevsync", "status", "x"],
      ["dmsetup", "info", "-c", "--noheadings", "x"],
      ["dmsetup", "ls", "--target", "thin"],
      ["dmsetup", "table", "x"],
      ["dmsetup", "targets"],
      ["losetup", "--list", "--json", "--output", "NAME"],
      ["thin_ls", "--metadata-snap", "/dev/loop1"],
      ["thin_check", "/dev/loop1"],
      ["sync", "-f", "/m"],
      ["fallocate", "-l", "1", "/f"],
    ];
    for (const a of yes) expect([a.join(" "), isStateChanging(a)]).toEqual([a.join(" "), true]);
    for (const a of no) expect([a.join(" "), isStateChanging(a)]).toEqual([a.join(" "), false]);
  });
});

describe("one state-changing command at a time on the host", () => {
  test("three processes: no two state-changing commands overlap; their reads do not wait", async () => {
    const q = freshQueue();
    const mut = (i: number) => [
      ["dmsetup", "create", `d${i}`, "--table", "0 8 zero"],
      ["dmsetup", "status", `d${i}`],
      ["mkfs.ext4", "-q", `/dev/mapper/d${i}`],
      ["umount", `/m${i}`],
    ];
    const ps = [0, 1, 2].map((i) => child(q, [...mut(i), ...mut(i + 10)], { ms: 40 }));
    const all = (await Promise.all(ps.map(lines))).flat();
    const spans = all.filter((l) => l.cmd);
    expect(spans).toHaveLength(24);
    expect(new Set(spans.map((s) => s.pid)).size).toBe(3);
    const changing = spans.filter((s) => isStateChanging(s.cmd!.split(" ")));
    expect(changing).toHaveLength(18);
    expect(overlaps(changing)).toEqual([]);
    // reads ran while another process held the queue
    const reads = spans.filter((s) => s.cmd!.includes(" status "));
    expect(reads.some((r) => changing.some((c) => c.pid !== r.pid && r.start! < c.end! && c.start! < r.end!))).toBe(true);
    expect(all.filter((l) => l.error)).toEqual([]);
  }, 30_000);

  test("a waiter says whose command it waits for, and waits in the order asked", async () => {
    const q = freshQueue();
    const holder = child(q, [["dmsetup", "remove", "long"]], { ms: 1_600 });
    await heldBy(q, "dmsetup remove long");
    const b = child(q, [["dmsetup", "remove", "b"]], { ms: 10 });
    // "asked" is when b's ticket is down, not when its process was spawned (a start under load can
    // take longer than the gap between two spawns)
    const waiting = `${q}.waiting`;
    const until = Date.now() + 20_000;
    while (!(existsSync(waiting) && readdirSync(waiting).length > 0) && Date.now() < until) await Bun.sleep(10);
    const c = child(q, [["dmsetup", "remove", "c"]], { ms: 10 });
    const [lh, lb, lc] = await Promise.all([lines(holder), lines(b), lines(c)]);
    const hold = lh.find((l) => l.cmd)!;
    const sb = lb.find((l) => l.cmd)!;
    const sc = lc.find((l) => l.cmd)!;
    expect(sb.start!).toBeGreaterThanOrEqual(hold.end!);
    expect(sc.start!).toBeGreaterThanOrEqual(sb.end!);
    const waitMsg = lb.find((l) => l.info)?.info ?? "";
    expect(waitMsg).toContain(`waiting for the dm queue held by pid ${holder.pid}`);
    expect(waitMsg).toContain("`dmsetup remove long`");
    expect(waitMsg).toContain("dmsetup remove b");
  }, 30_000);

  test("waiting is bounded: past THINIMG_DM_QUEUE_WAIT the command is refused, naming the holder, and never sent", async () => {
    const q = freshQueue();
    const holder = child(q, [["dmsetup", "remove", "long"]], { ms: 2_000 });
    await heldBy(q, "dmsetup remove long");
    const w = child(q, [["dmsetup", "remove", "w"]], { ms: 10, env: { THINIMG_DM_QUEUE_WAIT: "300ms" } });
    const lw = await lines(w);
    expect(lw.filter((l) => l.cmd)).toEqual([]);
    expect(lw.find((l) => l.error)?.error).toMatch(
      new RegExp(`gave up after \\d+ s waiting for the dm queue held by pid ${holder.pid} .*dmsetup remove long.* to run \`dmsetup remove w\``),
    );
    await lines(holder);
  }, 30_000);

  test("uncontended: taken without leaving a ticket; a live waiter's older ticket still goes first", async () => {
    const q = freshQueue();
    const prev = process.env.THINIMG_DM_QUEUE;
    process.env.THINIMG_DM_QUEUE = q;
    try {
      let seen = null as string[] | null;
      setRunner(async (argv) => {
        seen = readdirSync(`${q}.waiting`);
        expect(readFlockRecord(q)).toContain(argv.join(" "));
        return { argv, stdout: "", stderr: "", exitCode: 0, signal: null, timedOut: false, durationMs: 1 };
      });
      await dmsetup.remove("fast");
      expect(seen).toEqual([]); // the waiting room was made, no ticket left in it
      // a live waiter (this process's pid and start time) asked first: we wait until its ticket is gone
      const older = `${q}.waiting/000000000000001-${process.pid}-${processStartTime(process.pid) ?? 0}`;
      writeFileSync(older, "");
      setTimeout(() => rmSync(older), 300);
      const t0 = Date.now();
      await dmsetup.remove("after");
      expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
      expect(seen).toEqual([]);
    } finally {
      if (prev === undefined) delete process.env.THINIMG_DM_QUEUE;
      else process.env.THINIMG_DM_QUEUE = prev;
    }
  });

  test("a holder that died (SIGKILL) or a dead waiter's ticket never blocks", async () => {
    const q = freshQueue();
    const holder = child(q, [["dmsetup", "remove", "forever"]], { ms: 60_000 });
    await heldBy(q, "dmsetup remove forever");
    // a ticket left by a process that is gone, older than anyone's
    writeFileSync(`${q}.waiting/000000000000001-999999-1`, "");
    holder.kill("SIGKILL");
    await holder.exited;
    const t0 = Date.now();
    const next = await lines(child(q, [["dmsetup", "remove", "next"]], { ms: 10 }));
    expect(next.filter((l) => l.cmd).map((l) => l.cmd)).toEqual(["dmsetup remove next"]);
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(existsSync(`${q}.waiting/000000000000001-999999-1`)).toBe(false);
  }, 30_000);

  test("withSuspended holds the queue from suspend to resume: another process's command cannot slip in between", async () => {
    const q = freshQueue();
    const a = child(q, [], { ms: 20, body: `await dmsetup.withSuspended("dev1", async () => { await Bun.sleep(600); });` });
    await Bun.sleep(350);
    const b = child(q, [["dmsetup", "create", "other", "--table", "0 8 zero"]], { ms: 20 });
    const [la, lb] = await Promise.all([lines(a), lines(b)]);
    const resume = la.find((l) => l.cmd?.includes("resume"))!;
    expect(la.filter((l) => l.cmd).map((l) => l.cmd!.replace(/ --noudevsync| --verifyudev/g, ""))).toEqual(["dmsetup suspend dev1", "dmsetup resume dev1"]);
    expect(lb.find((l) => l.cmd)!.start!).toBeGreaterThanOrEqual(resume.end!);
  }, 30_000);
});

describe("after a timeout, nothing more is sent to that device in the run", () => {
  const timedOut = (argv: string[]): CmdResult => ({ argv, stdout: "", stderr: "", exitCode: null, signal: "SIGKILL", timedOut: true, durationMs: 100 });
  const ok = (argv: string[]): CmdResult => ({ argv, stdout: "", stderr: "", exitCode: 0, signal: null, timedOut: false, durationMs: 1 });

  test("an umount that timed out: the device's remove is refused without a command; other devices go on; resume stays allowed", async () => {
    process.env.THINIMG_DM_QUEUE = freshQueue();
    const calls: string[] = [];
    setRunner(async (argv) => {
      calls.push(argv.filter((a) => !a.startsWith("--")).join(" "));
      return argv[0] === "umount" ? timedOut(argv) : ok(argv);
    });
    const ctx = { pool_name: "p", device_id: 3, device_name: "thinimg-p-layer-3" };
    await expect(mnt.umount("/tmp/m3", { ctx })).rejects.toThrow(/timed out/);
    const e = await dmsetup.remove("thinimg-p-layer-3", { ctx }).catch((x) => x);
    expect(e.message).toContain("refusing `dmsetup");
    expect(e.message).toContain("`umount /tmp/m3` on thinimg-p-layer-3 timed out earlier in this run");
    expect(e.hint).toContain("bun scripts/gc.ts --force");
    await expect(mnt.mount("/dev/mapper/thinimg-p-layer-3", "/tmp/m9")).rejects.toThrow(/refusing/);
    await dmsetup.remove("thinimg-p-layer-4");
    await dmsetup.resume("thinimg-p-layer-3");
    expect(calls).toEqual(["umount /tmp/m3", "dmsetup remove thinimg-p-layer-4", "dmsetup resume thinimg-p-layer-3"]);
  });
});

describe("before-records", () => {
  test("written and flushed before the command is spawned, with started_at; reads get none", async () => {
    process.env.THINIMG_DM_QUEUE = freshQueue();
    const state = join(dir, "state1");
    useCommandJournal(state);
    const seenBefore: string[] = [];
    setRunner(async () => {
      const lastLine = readFileSync(journalPath(state), "utf8").trimEnd().split("\n").at(-1)!;
      seenBefore.push(lastLine);
      return spawnRunner(["true"], {});
    });
    await dmsetup.remove("thinimg-p-layer-5", { ctx: { pool_name: "p", device_id: 5 } });
    await dmsetup.info("thinimg-p-layer-5").catch(() => null); // a read: no before-record
    const before = JSON.parse(seenBefore[0]!);
    expect(before).toMatchObject({
      event: "cmd_start",
      pool_name: "p",
      device_id: 5,
      device_name: "thinimg-p-layer-5",
      duration_ms: null,
      exit_code: null,
      timed_out: null,
    });
    expect(before.command).toMatch(/^dmsetup .*remove thinimg-p-layer-5$/);
    expect(before.started_at).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    const recs = readFileSync(journalPath(state), "utf8")
      .trimEnd()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(recs.map((r) => r.event)).toEqual(["cmd_start"]); // the fake runner emits no after-record
    expect(seenBefore).toHaveLength(2);
  });

  test("a real command: before- and after-record in the journal with the same command; JSON log format shows both on stderr", async () => {
    const state = join(dir, "state2");
    const script = `
      import { useCommandJournal } from "${lib}/cmd-journal.ts";
      import { run } from "${lib}/exec.ts";
      useCommandJournal(${JSON.stringify(state)});
      await run(["umount", ${JSON.stringify(join(dir, "not-mounted"))}], { ctx: { pool_name: "p", device_name: "thinimg-p-layer-6" } });
    `;
    const p = Bun.spawn(["bun", "-e", script], {
      env: { ...process.env, THINIMG_DM_QUEUE: freshQueue(), THINIMG_LOG_FORMAT: "json" },
      stdout: "pipe",
      stderr: "pipe",
    });
    const err = await new Response(p.stderr).text();
    await p.exited;
    const shown = err
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l));
    expect(shown.map((r) => r.event)).toEqual(["cmd_start", "cmd"]);
    const recs = readFileSync(journalPath(state), "utf8")
      .trimEnd()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(recs.map((r) => r.event)).toEqual(["cmd_start", "cmd"]);
    expect(recs[0].command).toBe(recs[1].command);
    expect(recs[1].exit_code).not.toBe(0);
    expect(Date.parse(recs[1].started_at)).toBeGreaterThanOrEqual(Date.parse(recs[0].started_at));
  }, 30_000);

  test("the journal is bounded: past the size limit it rotates, keeping a fixed number of files", () => {
    const state = join(dir, "state3");
    useCommandJournal(state);
    for (let i = 0; i < 40; i++) journal({ event: "cmd_start", i, pad: "x".repeat(100) }, { sync: false, maxBytes: 1_000 });
    const path = journalPath(state);
    for (let k = 1; k <= JOURNAL_KEEP; k++) expect(existsSync(`${path}.${k}`)).toBe(true);
    expect(existsSync(`${path}.${JOURNAL_KEEP + 1}`)).toBe(false);
    const last = readFileSync(path, "utf8")
      .trimEnd()
      .split("\n")
      .map((l) => JSON.parse(l).i);
    expect(last.at(-1)).toBe(39);
    expect(readFileSync(path, "utf8").length).toBeLessThan(1_000 + 200);
  });
});
