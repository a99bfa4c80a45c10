// Locks with real processes: a child holds the lock, we see who holds it and since when; kill -9 the
// child and the stale lock is taken over; a PID with another start time counts as dead.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { acquireNamedLock, acquireProcessLock, processStartTime, readLockFile, staleness, withProcessLock } from "../../lib/lock/index.ts";
import { type Db, openDb } from "../../lib/store/index.ts";
import { getLockRow } from "../../lib/store/locks.ts";
import { captureWarnings } from "../helpers/log.ts";

const dir = mkdtempSync("/tmp/thinimg-lock-test-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const LIB = join(import.meta.dir, "../../lib");

let n = 0;
function freshState(): { dbPath: string; lockFile: string; db: Db } {
  const d = join(dir, `s${++n}`);
  const dbPath = join(d, "state.db");
  return { dbPath, lockFile: join(d, "thinimg.lock"), db: openDb(dbPath) };
}

/** A child bun process that takes a lock, prints READY, holds it for holdMs, then releases and exits. */
function holder(kind: "process" | "named", dbPath: string, target: string, holdMs: number) {
  const code = `
    import { openDb } from ${JSON.stringify(`${LIB}/store/index.ts`)};
    import { acquireProcessLock, acquireNamedLock } from ${JSON.stringify(`${LIB}/lock/index.ts`)};
    const db = openDb(${JSON.stringify(dbPath)});
    const l = ${kind === "process" ? `await acquireProcessLock(${JSON.stringify(target)}, { waitMs: 0, command: "test-holder" })` : `await acquireNamedLock(db, ${JSON.stringify(target)}, { waitMs: 0, command: "test-holder" })`};
    console.log("READY");
    await Bun.sleep(${holdMs});
    l.release();
    console.log("RELEASED");`;
  const p = Bun.spawn(["bun", "-e", code], { stdout: "pipe", stderr: "inherit" });
  const reader = p.stdout.getReader();
  const ready = (async () => {
    const r = await reader.read();
    const text = new TextDecoder().decode(r.value);
    if (!text.includes("READY")) throw new Error(`holder did not start: ${text}`);
  })();
  return { proc: p, ready };
}

describe("process lock file", () => {
  test("a live holder blocks; the error names its pid, command and since when", async () => {
    const s = freshState();
    const h = holder("process", s.dbPath, s.lockFile, 30_000);
    await h.ready;
    const onFile = readLockFile(s.lockFile)!;
    expect(onFile.pid).toBe(h.proc.pid);
    expect(onFile.startTime).toBe(processStartTime(h.proc.pid));
    expect(onFile.command).toBe("test-holder");
    const t0 = Date.now();
    const err = await acquireProcessLock(s.lockFile, { waitMs: 300 }).catch((e) => e);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect(err.kind).toBe("conflict");
    expect(err.message).toContain(`pid ${h.proc.pid} (test-holder) on ${hostname()} since ${new Date(onFile.acquiredAt).toISOString()}`);
    h.proc.kill(9);
    await h.proc.exited;
  });

  test("kill -9 the holder → the stale lock is taken over with a warning", async () => {
    const s = freshState();
    const h = holder("process", s.dbPath, s.lockFile, 30_000);
    await h.ready;
    h.proc.kill(9);
    await h.proc.exited;
    const w = captureWarnings();
    const lock = await acquireProcessLock(s.lockFile, { waitMs: 0 });
    w.stop();
    expect(w.lines.join("\n")).toMatch(new RegExp(`taking over stale lock .*pid ${h.proc.pid} is not running`));
    expect(readLockFile(s.lockFile)!.pid).toBe(process.pid);
    lock.release();
    expect(readLockFile(s.lockFile)).toBeNull();
  });

  test("a reused PID (different start time) is stale", async () => {
    const s = freshState();
    // a live process (us) but the lock records another start time: the PID was reused
    writeFileSync(s.lockFile, JSON.stringify({ pid: process.pid, start_time: 1, host: hostname(), command: "old", acquired_at: 1 }));
    expect(staleness({ pid: process.pid, startTime: 1, host: hostname() })).toEqual({
      stale: true,
      why: `pid ${process.pid} was reused (start time ${processStartTime(process.pid)}, lock says 1)`,
    });
    const lock = await acquireProcessLock(s.lockFile, { waitMs: 0 });
    expect(readLockFile(s.lockFile)!.startTime).toBe(processStartTime(process.pid));
    lock.release();
  });

  test("a holder on another host is never judged stale", () => {
    expect(staleness({ pid: 999999, startTime: 1, host: `${hostname()}-elsewhere` })).toEqual({ stale: false });
  });

  test("a waiter gets the lock as soon as the holder releases it", async () => {
    const s = freshState();
    const h = holder("process", s.dbPath, s.lockFile, 400);
    await h.ready;
    const t0 = Date.now();
    const lock = await acquireProcessLock(s.lockFile, { waitMs: 10_000 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(Date.now() - t0).toBeLessThan(5_000);
    lock.release();
    expect(readLockFile(s.lockFile)).toBeNull();
    await h.proc.exited;
  });

  test("re-entrant only when nested: another async path of the same process waits for the holder", async () => {
    const s = freshState();
    const order: string[] = [];
    let releaseOuter!: () => void;
    const outerHeld = new Promise<void>((r) => {
      releaseOuter = r;
    });
    let outerIn!: () => void;
    const outerStarted = new Promise<void>((r) => {
      outerIn = r;
    });
    const outer = withProcessLock(s.lockFile, { waitMs: 0 }, async () => {
      // a nested acquire (same call chain) gets it at once, and releasing it keeps the outer hold
      await withProcessLock(s.lockFile, { waitMs: 0 }, async () => void order.push("nested"));
      expect(readLockFile(s.lockFile)!.pid).toBe(process.pid);
      outerIn();
      await outerHeld;
      order.push("outer done");
    });
    await outerStarted;
    // not nested: refused at once with waitMs 0, naming this process as the holder …
    const err = (await acquireProcessLock(s.lockFile, { waitMs: 0 }).catch((e) => e)) as Error;
    expect(err.message).toContain(`locked by pid ${process.pid}`);
    // … and with a wait, it gets the lock only after the outer section is done
    const waiter = withProcessLock(s.lockFile, { waitMs: 5_000 }, async () => void order.push("other path"));
    await Bun.sleep(200);
    expect(order).toEqual(["nested"]);
    releaseOuter();
    await Promise.all([outer, waiter]);
    expect(order).toEqual(["nested", "outer done", "other path"]);
    expect(readLockFile(s.lockFile)).toBeNull();
  });
});

describe("named (per-image) locks in SQLite", () => {
  test("live holder → bounded wait then an error naming it; kill -9 → taken over", async () => {
    const s = freshState();
    const h = holder("named", s.dbPath, "image:p:app", 30_000);
    await h.ready;
    const err = await acquireNamedLock(s.db, "image:p:app", { waitMs: 200, what: "image app" }).catch((e) => e);
    expect(err.kind).toBe("conflict");
    expect(err.message).toMatch(new RegExp(`^image app is locked by pid ${h.proc.pid} \\(test-holder\\) on .* since \\d{4}-`));
    h.proc.kill(9);
    await h.proc.exited;
    const w = captureWarnings();
    const l = await acquireNamedLock(s.db, "image:p:app", { waitMs: 0 });
    w.stop();
    expect(w.lines.join("\n")).toContain(`pid ${h.proc.pid} is not running`);
    expect(getLockRow(s.db, "image:p:app")!.pid).toBe(process.pid);
    l.release();
    expect(getLockRow(s.db, "image:p:app")).toBeNull();
  });

  test("five processes contending: critical sections never overlap", async () => {
    const s = freshState();
    const logFile = join(dir, `cs${n}.log`);
    writeFileSync(logFile, "");
    const code = `
      import { openDb } from ${JSON.stringify(`${LIB}/store/index.ts`)};
      import { acquireNamedLock } from ${JSON.stringify(`${LIB}/lock/index.ts`)};
      import { appendFileSync } from "node:fs";
      const db = openDb(${JSON.stringify(s.dbPath)});
      for (let i = 0; i < 3; i++) {
        const l = await acquireNamedLock(db, "image:p:x", { waitMs: 30000 });
        appendFileSync(${JSON.stringify(logFile)}, "in " + process.pid + "\\n");
        await Bun.sleep(20);
        appendFileSync(${JSON.stringify(logFile)}, "out " + process.pid + "\\n");
        l.release();
      }`;
    const procs = Array.from({ length: 5 }, () => Bun.spawn(["bun", "-e", code], { stderr: "inherit" }));
    expect(await Promise.all(procs.map((p) => p.exited))).toEqual([0, 0, 0, 0, 0]);
    const lines = readFileSync(logFile, "utf8").trim().split("\n");
    expect(lines).toHaveLength(30);
    for (let i = 0; i < lines.length; i += 2) {
      const pid = lines[i]!.split(" ")[1];
      expect([lines[i], lines[i + 1]]).toEqual([`in ${pid}`, `out ${pid}`]);
    }
  });
});
