// The process lock file (<stateDir>/thinimg.lock): one thinimg process at a time changes the pool.
// It is held around each pool-changing section (intent → pool message → transaction id → record),
// not for a whole unpack, so activations are never stuck behind a long layer apply; GC holds it for
// its whole run. The file says who holds it (PID, start time, host, command, since when).
//
// Check-and-write happens inside an IMMEDIATE transaction on the state DB: SQLite's write lock is the
// mutex that makes stale takeover race-free, and the kernel drops it if we die.

import type { Database } from "bun:sqlite";
import { AsyncLocalStorage } from "node:async_hooks";
import { existsSync, readFileSync, renameSync, unlinkSync, writeFileSync } from "node:fs";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { currentHolder, describeHolder, type Holder, isSelf, sleep, staleness } from "./owner.ts";

export interface ProcessLockOptions {
  /** How long to wait for a live holder; 0 = fail at once. */
  waitMs: number;
  command?: string;
  /** Called once when we start waiting (progress UIs). */
  onWait?: (holder: Holder) => void;
}

export function readLockFile(path: string): Holder | null {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return null;
  }
  try {
    const j = JSON.parse(text) as Record<string, unknown>;
    return {
      pid: Number(j.pid),
      startTime: j.start_time === null || j.start_time === undefined ? null : Number(j.start_time),
      host: String(j.host ?? ""),
      command: String(j.command ?? ""),
      acquiredAt: Number(j.acquired_at ?? 0),
    };
  } catch {
    // unreadable content: treat as a dead holder (pid 0) so it can be taken over, with a warning
    return { pid: 0, startTime: null, host: "", command: "(unreadable lock file)", acquiredAt: 0 };
  }
}

export function writeLockFile(path: string, h: Holder): void {
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(
    tmp,
    `${JSON.stringify({ pid: h.pid, start_time: h.startTime, host: h.host, command: h.command, acquired_at: h.acquiredAt, acquired_at_iso: new Date(h.acquiredAt).toISOString() })}\n`,
    { mode: 0o644 },
  );
  renameSync(tmp, path);
}

export class ProcessLock {
  private depth = 1;
  constructor(
    readonly path: string,
    private readonly db: Database,
    readonly holder: Holder,
  ) {}

  /** Nested acquire in the same process (re-entrant). */
  retain(): this {
    this.depth++;
    return this;
  }

  release(): void {
    if (--this.depth > 0) return;
    held.delete(this.path);
    this.db
      .transaction(() => {
        const cur = readLockFile(this.path);
        if (cur && isSelf(cur)) unlinkSync(this.path);
      })
      .immediate();
  }
}

const held = new Map<string, ProcessLock>();
/** Lock files held by the current async call chain (withProcessLock): only these are re-entered.
 * Another async path of this process that wants a held lock waits for it like another process. */
const nesting = new AsyncLocalStorage<ReadonlySet<string>>();

type Attempt = { ok: true; lock: ProcessLock } | { ok: false; holder: Holder };

function tryAcquire(path: string, db: Database, command: string | undefined): Attempt {
  return db
    .transaction((): Attempt => {
      const cur = existsSync(path) ? readLockFile(path) : null;
      if (cur && !isSelf(cur)) {
        const s = cur.pid === 0 ? { stale: true as const, why: "lock file unreadable" } : staleness(cur);
        if (!s.stale) return { ok: false, holder: cur };
        log.warn(`taking over stale lock ${path}: ${s.why} (was ${describeHolder(cur)})`);
      }
      const me = currentHolder(command);
      writeLockFile(path, me);
      return { ok: true, lock: new ProcessLock(path, db, me) };
    })
    .immediate();
}

/** Acquire the process lock, waiting up to waitMs for a live holder. Re-entrant only for real
 * nesting: a call made inside withProcessLock's fn (same async call chain) shares the lock; any
 * other caller in this process waits until it is released. */
export async function acquireProcessLock(path: string, db: Database, o: ProcessLockOptions): Promise<ProcessLock> {
  const mine = held.get(path);
  if (mine && nesting.getStore()?.has(path)) return mine.retain();
  const deadline = Date.now() + o.waitMs;
  let delay = 25;
  let announced = false;
  for (;;) {
    const ours = held.get(path);
    const a: Attempt = ours ? { ok: false, holder: ours.holder } : tryAcquire(path, db, o.command);
    if (a.ok) {
      held.set(path, a.lock);
      return a.lock;
    }
    if (Date.now() >= deadline) {
      throw new ThinimgError("conflict", `the state dir is locked by ${describeHolder(a.holder)}`, {
        hint: `wait for it to finish or pass a longer --wait; a lock whose process is gone is taken over automatically (${path})`,
        details: { lock: path, holder: a.holder },
      });
    }
    if (!announced) {
      announced = true;
      o.onWait?.(a.holder);
      log.info(`waiting for the state dir lock held by ${describeHolder(a.holder)}`);
    }
    await sleep(Math.min(delay, Math.max(1, deadline - Date.now())));
    delay = Math.min(delay * 2, 500);
  }
}

export async function withProcessLock<T>(path: string, db: Database, o: ProcessLockOptions, fn: () => Promise<T>): Promise<T> {
  const lock = await acquireProcessLock(path, db, o);
  try {
    return await nesting.run(new Set([...(nesting.getStore() ?? []), path]), fn);
  } finally {
    lock.release();
  }
}
