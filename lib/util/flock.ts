// The one lock primitive: an exclusive flock(2) on a file. The kernel drops a flock when its process
// dies (or the host reboots), so a holder is always a live process: no stale-lock handling needed.
// The holder may write one line into the file saying who it is, for a waiter's messages only.
//
// The file is removed on release. A waiter that had the old file open could then lock a file no
// longer at `path`, so a lock counts only once `path` still names the file we locked.
import { closeSync, fstatSync, ftruncateSync, openSync, readFileSync, statSync, unlinkSync, writeSync } from "node:fs";
import { tryFlockExclusive, unflock } from "./libc.ts";

export interface Flock {
  path: string;
  /** The record a holder that died holding it left in the file (null when it was released). */
  previous: string | null;
  release(): void;
}

export interface FlockOptions {
  /** Who holds it (one line, e.g. JSON), written into the file once it is ours. */
  record?: string;
  /** File mode when created; default 0600. */
  mode?: number;
}

/** The file still at `path` is the one open as `fd`: its size, else null. */
function stillThere(path: string, fd: number): number | null {
  try {
    const a = statSync(path);
    const b = fstatSync(fd);
    return a.ino === b.ino && a.dev === b.dev ? b.size : null;
  } catch {
    return null;
  }
}

/** Take the lock now, or null when another open file (any process, or another path of this one) holds it. */
export function tryFlock(path: string, o: FlockOptions = {}): Flock | null {
  for (;;) {
    const fd = openSync(path, "a", o.mode ?? 0o600);
    if (!tryFlockExclusive(fd)) {
      closeSync(fd);
      return null;
    }
    const size = stillThere(path, fd);
    if (size === null) {
      closeSync(fd); // released (and removed) while we opened it: take the new one
      continue;
    }
    // an empty file (the usual case: a release removes it) has no record to read or truncate
    const previous = size === 0 ? null : readFlockRecord(path);
    if (o.record !== undefined) {
      if (size > 0) ftruncateSync(fd, 0);
      writeSync(fd, o.record.endsWith("\n") ? o.record : `${o.record}\n`);
    }
    let held = true;
    return {
      path,
      previous,
      release() {
        if (!held) return;
        held = false;
        try {
          unlinkSync(path);
        } catch {}
        unflock(fd);
        closeSync(fd);
      },
    };
  }
}

/**
 * Whether a process holds the flock on `path` now. A file nobody holds is one its holder left when
 * it died: it is removed. null: there is no such file.
 */
export function flockHeld(path: string): boolean | null {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw e;
  }
  try {
    if (!tryFlockExclusive(fd)) return true;
    if (stillThere(path, fd) !== null) {
      try {
        unlinkSync(path);
      } catch {}
    }
    unflock(fd);
    return false;
  } finally {
    closeSync(fd);
  }
}

/** What the holder wrote into the lock file, or null (free, or it has not written yet). */
export function readFlockRecord(path: string): string | null {
  try {
    const t = readFileSync(path, "utf8").trim();
    return t === "" ? null : t;
  } catch {
    return null;
  }
}

export interface FlockWaitOptions extends FlockOptions {
  /** Called once, when the first try finds it held, with the holder's record. */
  onWait?: (record: string | null) => void;
  /** Longest pause between tries; default 250 ms. */
  maxPollMs?: number;
}

/** Take the lock, polling up to waitMs. null: still held by another holder. */
export async function acquireFlock(path: string, waitMs: number, o: FlockWaitOptions = {}): Promise<Flock | null> {
  const deadline = Date.now() + waitMs;
  let delay = 25;
  let announced = false;
  for (;;) {
    const lock = tryFlock(path, o);
    if (lock) return lock;
    if (Date.now() >= deadline) return null;
    if (!announced) {
      announced = true;
      o.onWait?.(readFlockRecord(path));
    }
    await Bun.sleep(Math.min(delay, Math.max(1, deadline - Date.now())));
    delay = Math.min(delay * 2, o.maxPollMs ?? 250);
  }
}
