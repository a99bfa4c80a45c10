// The state dir as a reader-writer lock over the pool. Every operation that creates or uses pool
// state (an unpack, an activation, a release — a script's whole run, or one job of a service) is a
// SHARED holder: it holds <state dir>/holders/<pid>-<start time>.json for its run. `gc --force` and
// `recover-pool` are EXCLUSIVE: they hold <state dir>/exclusive.lock, then wait (up to --wait) for
// the shared holders to finish, and refuse with one line naming every one of them — unless
// --ignore-lock, which takes no part in the lock and goes ahead with a warning. New shared holders
// wait while an exclusive one is live. Each side takes its own file before looking at the other's,
// so of two that arrive together at least one sees the other. Every file is a flock (util/flock.ts)
// holding its holder's record: a file whose holder died is not held, never blocks and is removed.
// (The process lock file, thinimg.lock, stays the short mutex around pool sections.)
import { existsSync, mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { type Flock, flockHeld, tryFlock } from "../util/flock.ts";
import { currentHolder, describeHolder, type Holder, isSelf, sleep } from "./owner.ts";
import { holderRecord, readLockFile } from "./process-lock.ts";

export const HOLDERS_DIR = "holders";
export const EXCLUSIVE_FILE = "exclusive.lock";
const POLL_MS = 100;

/** A holder file's holder while it is held, or null (and the file removed) when it is not. */
function live(path: string): Holder | null {
  if (!flockHeld(path)) return null;
  // held, but its record not written yet: a holder starting up
  return readLockFile(path) ?? { pid: 0, startTime: null, host: "", command: "(starting)", acquiredAt: Date.now() };
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
  /** Keep the hold this long after the last operation using it ends (a long-lived service: the next
   * request joins it instead of taking the file again). An exclusive holder that arrives meanwhile
   * is seen within LINGER_CHECK_MS and the hold given up; a request that finds one waiting gives the
   * hold up too and waits its turn. */
  lingerMs?: number;
}

/** Shared holds this process has open, by holder file: one file however many run at once (a
 * service answers an activation while a job unpacks). linger: the timer that releases a hold no
 * operation uses any more. */
interface OpenHold {
  flock: Promise<Flock>;
  count: number;
  linger: ReturnType<typeof setInterval> | null;
}
const openHolds = new Map<string, OpenHold>();
/** How often a lingering hold looks for an exclusive holder waiting for it. */
export const LINGER_CHECK_MS = 100;

async function releaseHold(mine: string, open: OpenHold): Promise<void> {
  if (open.linger) clearInterval(open.linger);
  open.linger = null;
  if (openHolds.get(mine) === open) openHolds.delete(mine);
  (await open.flock).release();
}

/** Take our holder file once no exclusive holder is live; waits (bounded) while one is. */
async function acquireShared(stateDir: string, mine: string, me: Holder, waitMs: number): Promise<Flock> {
  const deadline = Date.now() + waitMs;
  let announced = false;
  for (;;) {
    let ex = liveExclusive(stateDir);
    if (!ex) {
      // null only while another process probes the file for a moment: try again
      const flock = tryFlock(mine, { record: holderRecord(me), mode: 0o644 });
      ex = liveExclusive(stateDir);
      if (flock && !ex) return flock;
      flock?.release();
    }
    if (!ex && Date.now() >= deadline + 1_000) {
      throw new ThinimgError("conflict", `${mine} stays locked by another process`, { hint: "retry; if it persists, check what holds it (lsof)" });
    }
    if (ex && Date.now() >= deadline) {
      throw new ThinimgError("conflict", `the state dir is held exclusively by ${describeHolder(ex)}`, {
        hint: "wait for it to finish or pass a longer --wait (a holder whose process is gone never blocks)",
        details: { holder: ex },
      });
    }
    if (ex && !announced) {
      announced = true;
      log.info(`waiting for ${describeHolder(ex)} (it needs the state dir alone)`);
    }
    await sleep(ex ? Math.min(POLL_MS, Math.max(1, deadline - Date.now())) : 5);
  }
}

/** Give up every hold that is only lingering (a service stopping). */
export async function releaseLingeringHolds(): Promise<void> {
  await Promise.all([...openHolds].filter(([, h]) => h.count === 0).map(([mine, h]) => releaseHold(mine, h)));
}

/** Hold the state dir shared for fn's run: waits (bounded) while gc --force or recover-pool acts. */
export async function withSharedHold<T>(stateDir: string, o: HoldOptions, fn: () => Promise<T>): Promise<T> {
  const dir = join(stateDir, HOLDERS_DIR);
  mkdirSync(dir, { recursive: true });
  const me = currentHolder(o.command);
  const mine = join(dir, `${me.pid}-${me.startTime ?? 0}.json`);
  // a hold this process already has open is joined, never waited for (an exclusive waiter waits for
  // it); one only lingering after its last operation is given up when an exclusive holder waits
  let open = openHolds.get(mine);
  if (open && open.count === 0 && liveExclusive(stateDir)) {
    await releaseHold(mine, open);
    open = undefined;
  }
  if (!open) {
    open = { flock: acquireShared(stateDir, mine, me, o.waitMs), count: 0, linger: null };
    openHolds.set(mine, open);
  }
  if (open.linger) clearInterval(open.linger);
  open.linger = null;
  open.count++;
  const held = open;
  const leave = async () => {
    if (--held.count > 0) return;
    if (!o.lingerMs) return releaseHold(mine, held);
    const until = Date.now() + o.lingerMs;
    held.linger = setInterval(
      () => {
        if (held.count === 0 && (Date.now() >= until || liveExclusive(stateDir))) void releaseHold(mine, held);
      },
      Math.min(LINGER_CHECK_MS, o.lingerMs),
    );
    held.linger.unref();
  };
  try {
    await held.flock;
  } catch (e) {
    if (--held.count === 0 && openHolds.get(mine) === held) openHolds.delete(mine);
    throw e;
  }
  try {
    return await fn();
  } finally {
    await leave();
  }
}

export interface ExclusiveHold {
  /** Holders that were live when --ignore-lock went ahead anyway (empty otherwise). */
  ignored: Holder[];
  release(): void;
}

/** Refused: the state dir stayed in use until the deadline. */
function inUse(what: string, others: Holder[]): ThinimgError {
  return new ThinimgError(
    "conflict",
    `${what}: the state dir is in use by ${others.length === 1 ? "" : `${others.length} processes: `}${describeAll(others)}; nothing was done`,
    { hint: "wait for them to finish (or pass a longer --wait); gc --ignore-lock goes ahead anyway", details: { holders: others } },
  );
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
  const record = holderRecord(currentHolder(o.command));
  const deadline = Date.now() + o.waitMs;
  let mine: Flock | null = null;
  let announced = false;
  for (;;) {
    mine ??= tryFlock(path, { record, mode: 0o644 });
    // another exclusive holder (this process's too: exclusive holds do not nest)
    const ex = mine ? null : live(path);
    const others = [...(ex ? [ex] : []), ...sharedHolders(stateDir)];
    if (mine && others.length === 0) return { ignored: [], release: () => mine?.release() };
    if (Date.now() >= deadline && others.length) {
      mine?.release();
      throw inUse(o.what, others);
    }
    if (!announced && others.length) {
      announced = true;
      log.info(`${o.what}: waiting for ${describeAll(others)} to finish`);
    }
    await sleep(Math.min(POLL_MS, Math.max(1, deadline - Date.now())));
  }
}
