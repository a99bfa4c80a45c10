// The state dir as a reader-writer lock over the pool. Every operation that creates or uses pool
// state (an unpack, an activation, a release — a script's whole run, or one job of a service) is a
// SHARED holder: it leaves <state dir>/holders/<pid>-<start time>.json for its run. `gc --force` and
// `recover-pool` are EXCLUSIVE: they write <state dir>/exclusive.lock, then wait (up to --wait) for
// the shared holders to finish, and refuse with one line naming every one of them — unless
// --ignore-lock, which takes no part in the lock and goes ahead with a warning. New shared holders
// wait while an exclusive one is live. Each side writes its own file before looking at the other's,
// so of two that arrive together at least one sees the other. Files of dead or reused PIDs never
// block: they are removed.
// (The process lock file, thinimg.lock, stays the short mutex around pool sections.)
import { existsSync, linkSync, mkdirSync, readdirSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { currentHolder, describeHolder, type Holder, isSelf, sleep, staleness } from "./owner.ts";
import { readLockFile, writeLockFile } from "./process-lock.ts";

export const HOLDERS_DIR = "holders";
export const EXCLUSIVE_FILE = "exclusive.lock";

/** A holder's file, or null (and the file removed) when its process is gone. */
function live(path: string): Holder | null {
  const h = readLockFile(path);
  if (!h) return null;
  if (h.pid === 0 || staleness(h).stale) {
    try {
      unlinkSync(path);
    } catch {}
    return null;
  }
  return h;
}

/** Live shared holders of a state dir (this process excluded). */
export function sharedHolders(stateDir: string): Holder[] {
  const dir = join(stateDir, HOLDERS_DIR);
  let names: string[];
  try {
    names = readdirSync(dir).filter((n) => n.endsWith(".json"));
  } catch {
    return [];
  }
  return names.map((n) => live(join(dir, n))).filter((h): h is Holder => h !== null && !isSelf(h));
}

function liveExclusive(stateDir: string): Holder | null {
  const h = live(join(stateDir, EXCLUSIVE_FILE));
  return h && !isSelf(h) ? h : null;
}

const describeAll = (hs: Holder[]) => hs.map(describeHolder).join("; ");

export interface HoldOptions {
  waitMs: number;
  command?: string;
}

/** Shared holds this process has open, by holder file: one file however many run at once (a
 * service answers an activation while a job unpacks). */
const openHolds = new Map<string, number>();

/** Write our holder file once no exclusive holder is live; waits (bounded) while one is. */
async function acquireShared(stateDir: string, mine: string, me: Holder, waitMs: number): Promise<void> {
  const deadline = Date.now() + waitMs;
  let announced = false;
  for (;;) {
    let ex = liveExclusive(stateDir);
    if (!ex) {
      writeLockFile(mine, me);
      ex = liveExclusive(stateDir);
      if (!ex) return;
      unlinkSync(mine);
    }
    if (Date.now() >= deadline) {
      throw new ThinimgError("conflict", `the state dir is held exclusively by ${describeHolder(ex)}`, {
        hint: "wait for it to finish or pass a longer --wait (a holder whose process is gone never blocks)",
        details: { holder: ex },
      });
    }
    if (!announced) {
      announced = true;
      log.info(`waiting for ${describeHolder(ex)} (it needs the state dir alone)`);
    }
    await sleep(Math.min(100, Math.max(1, deadline - Date.now())));
  }
}

/** Hold the state dir shared for fn's run: waits (bounded) while gc --force or recover-pool acts. */
export async function withSharedHold<T>(stateDir: string, o: HoldOptions, fn: () => Promise<T>): Promise<T> {
  const dir = join(stateDir, HOLDERS_DIR);
  mkdirSync(dir, { recursive: true });
  const me = currentHolder(o.command);
  const mine = join(dir, `${me.pid}-${me.startTime ?? 0}.json`);
  // a hold this process already has open is joined, never waited for (an exclusive waiter waits for it)
  if (!openHolds.has(mine)) await acquireShared(stateDir, mine, me, o.waitMs);
  openHolds.set(mine, (openHolds.get(mine) ?? 0) + 1);
  try {
    return await fn();
  } finally {
    const left = (openHolds.get(mine) ?? 1) - 1;
    if (left > 0) openHolds.set(mine, left);
    else {
      openHolds.delete(mine);
      try {
        unlinkSync(mine);
      } catch {}
    }
  }
}

export interface ExclusiveHold {
  /** Holders that were live when --ignore-lock went ahead anyway (empty otherwise). */
  ignored: Holder[];
  release(): void;
}

/**
 * Hold the state dir exclusively: wait up to waitMs for every other holder to finish, then refuse
 * with one line naming each (pid, start time, command). With ignoreLock it takes no part in the lock
 * at all (it neither waits nor makes others wait) and warns, naming whoever holds it.
 * A state dir that does not exist has no holders.
 */
export async function holdExclusive(stateDir: string, o: HoldOptions & { ignoreLock: boolean; what: string }): Promise<ExclusiveHold> {
  if (!existsSync(stateDir)) return { ignored: [], release() {} };
  if (o.ignoreLock) {
    const others = [liveExclusive(stateDir), ...sharedHolders(stateDir)].filter((h): h is Holder => h !== null);
    if (others.length) log.warn(`${o.what} --ignore-lock: going ahead while the state dir is held by ${describeAll(others)}`);
    return { ignored: others, release() {} };
  }
  const path = join(stateDir, EXCLUSIVE_FILE);
  const me = currentHolder(o.command);
  const deadline = Date.now() + o.waitMs;
  let mineWritten = false;
  const release = () => {
    if (!mineWritten) return;
    mineWritten = false;
    const cur = readLockFile(path);
    if (cur && isSelf(cur)) unlinkSync(path);
  };
  let announced = false;
  for (;;) {
    if (!mineWritten) {
      // written whole, then linked into place: link(2) fails if another one got there first
      const tmp = `${path}.${process.pid}`;
      writeLockFile(tmp, me);
      try {
        linkSync(tmp, path);
        mineWritten = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      } finally {
        unlinkSync(tmp);
      }
      if (!mineWritten && live(path) === null) continue; // its holder is gone (file removed): claim it again
    }
    const others = [...(mineWritten ? [] : [liveExclusive(stateDir)].filter((h): h is Holder => h !== null)), ...sharedHolders(stateDir)];
    if (mineWritten && others.length === 0) return { ignored: [], release };
    if (Date.now() >= deadline) {
      release();
      throw new ThinimgError(
        "conflict",
        `${o.what}: the state dir is in use by ${others.length === 1 ? "" : `${others.length} processes: `}${describeAll(others)}; nothing was done`,
        {
          hint: "wait for them to finish (or pass a longer --wait); gc --ignore-lock goes ahead anyway",
          details: { holders: others },
        },
      );
    }
    if (!announced) {
      announced = true;
      log.info(`${o.what}: waiting for ${describeAll(others)} to finish`);
    }
    await sleep(Math.min(100, Math.max(1, deadline - Date.now())));
  }
}
