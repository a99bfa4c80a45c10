// The process lock file (<stateDir>/thinimg.lock): one thinimg process at a time changes the pool.
// It is held around each pool-changing section (intent → pool message → transaction id → record),
// not for a whole unpack, so activations are never stuck behind a long layer apply; GC holds it for
// its whole run. It is a flock (util/flock.ts): the kernel drops it when its holder dies. The file
// says who holds it (PID, start time, host, command, since when) for the messages of those who wait.

import type { AsyncLocalStorage } from "node:async_hooks";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { acquireFlock, type Flock, readFlockRecord } from "../util/flock.ts";
import { currentHolder, describeHolder, type Holder, isSelf, staleness } from "./owner.ts";

export interface ProcessLockOptions {
  /** How long to wait for a live holder; 0 = fail at once. */
  waitMs: number;
  command?: string;
  /** Called once when we start waiting (progress UIs). */
  onWait?: (holder: Holder) => void;
}

/** A holder record (the JSON line a lock or holder file holds), or null when there is none. */
export function parseHolder(text: string | null): Holder | null {
  if (text === null) return null;
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
    // unreadable content: a dead holder (pid 0)
    return { pid: 0, startTime: null, host: "", command: "(unreadable lock file)", acquiredAt: 0 };
  }
}

export function holderRecord(h: Holder): string {
  return JSON.stringify({
    pid: h.pid,
    start_time: h.startTime,
    host: h.host,
    command: h.command,
    acquired_at: h.acquiredAt,
    acquired_at_iso: new Date(h.acquiredAt).toISOString(),
  });
}

export function readLockFile(path: string): Holder | null {
  return parseHolder(readFlockRecord(path));
}

export class ProcessLock {
  private depth = 1;
  constructor(
    private readonly flock: Flock,
    readonly holder: Holder,
  ) {}

  get path(): string {
    return this.flock.path;
  }

  /** Nested acquire in the same process (re-entrant). */
  retain(): this {
    this.depth++;
    return this;
  }

  release(): void {
    if (--this.depth > 0) return;
    held.delete(this.path);
    this.flock.release();
  }
}

const held = new Map<string, ProcessLock>();
/** Lock files held by the current async call chain (withProcessLock): only these are re-entered.
 * Another async path of this process that wants a held lock waits for it like another process. */
// Created at the first lock (node:async_hooks is a measurable part of a command's start); before
// it exists, no call chain holds any lock.
let nesting: AsyncLocalStorage<ReadonlySet<string>> | undefined;

/** A holder that died holding the lock left its record: say so once we have taken it over. */
function noteTakeover(path: string, previous: string | null): void {
  const was = parseHolder(previous);
  if (!was || isSelf(was)) return;
  const s = staleness(was);
  const why = was.pid === 0 ? "lock file unreadable" : s.stale ? s.why : "its holder released it without clearing it";
  log.warn(`taking over stale lock ${path}: ${why} (was ${describeHolder(was)})`);
}

/** Acquire the process lock, waiting up to waitMs for a live holder. Re-entrant only for real
 * nesting: a call made inside withProcessLock's fn (same async call chain) shares the lock; any
 * other caller in this process waits until it is released. */
export async function acquireProcessLock(path: string, o: ProcessLockOptions): Promise<ProcessLock> {
  const mine = held.get(path);
  if (mine && nesting?.getStore()?.has(path)) return mine.retain();
  const me = currentHolder(o.command);
  const onWait = (record: string | null) => {
    const h = parseHolder(record);
    if (!h) return;
    o.onWait?.(h);
    log.info(`waiting for the state dir lock held by ${describeHolder(h)}`);
  };
  const flock = await acquireFlock(path, o.waitMs, { record: holderRecord(me), mode: 0o644, maxPollMs: 500, onWait });
  if (!flock) {
    const h = readLockFile(path);
    throw new ThinimgError("conflict", `the state dir is locked by ${h ? describeHolder(h) : "another process"}`, {
      hint: `wait for it to finish or pass a longer --wait; a lock whose process is gone is taken over automatically (${path})`,
      details: { lock: path, holder: h },
    });
  }
  noteTakeover(path, flock.previous);
  const lock = new ProcessLock(flock, me);
  held.set(path, lock);
  return lock;
}

export async function withProcessLock<T>(path: string, o: ProcessLockOptions, fn: () => Promise<T>): Promise<T> {
  const lock = await acquireProcessLock(path, o);
  try {
    nesting ??= new (await import("node:async_hooks")).AsyncLocalStorage<ReadonlySet<string>>();
    return await nesting.run(new Set([...(nesting.getStore() ?? []), path]), fn);
  } finally {
    lock.release();
  }
}
