// Named locks in SQLite (per image, per layer chain): the row says who holds it; the same staleness
// rule as the process lock (dead PID or different start time → taken over with a warning).
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { type Db, tx } from "../store/db.ts";
import { deleteLockRow, getLockRow, type LockRow, putLockRow } from "../store/locks.ts";
import { currentHolder, describeHolder, type Holder, sleep, staleness } from "./owner.ts";

export interface NamedLockOptions {
  waitMs: number;
  command?: string;
  onWait?: (holder: Holder) => void;
  /** What the lock protects, for messages ("image busybox"). */
  what?: string;
}

export interface NamedLock {
  key: string;
  holder: Holder;
  /** True when we had to wait for another holder first (callers then re-check for its result). */
  waited: boolean;
  release(): void;
}

const toHolder = (r: LockRow): Holder => ({ pid: r.pid, startTime: r.start_time, host: r.host, command: r.command, acquiredAt: r.acquired_at });

type Attempt = { ok: true; holder: Holder } | { ok: false; holder: Holder };

export function tryAcquireNamed(db: Db, key: string, command?: string): Attempt {
  return tx(db, (): Attempt => {
    const row = getLockRow(db, key);
    if (row) {
      const h = toHolder(row);
      const s = staleness(h);
      if (!s.stale) return { ok: false, holder: h };
      log.warn(`taking over stale lock ${key}: ${s.why} (was ${describeHolder(h)})`);
    }
    const me = currentHolder(command);
    putLockRow(db, { key, pid: me.pid, start_time: me.startTime, host: me.host, command: me.command, acquired_at: me.acquiredAt });
    return { ok: true, holder: me };
  });
}

/** Acquire `key`, waiting (bounded) for a live holder. Not re-entrant: a second acquire of the same
 * key in the same process waits like any other caller. */
export async function acquireNamedLock(db: Db, key: string, o: NamedLockOptions): Promise<NamedLock> {
  const deadline = Date.now() + o.waitMs;
  let delay = 25;
  let waited = false;
  for (;;) {
    const a = tryAcquireNamed(db, key, o.command);
    if (a.ok) {
      const holder = a.holder;
      return {
        key,
        holder,
        waited,
        release: () => {
          deleteLockRow(db, key, holder.pid, holder.startTime);
        },
      };
    }
    if (Date.now() >= deadline) {
      throw new ThinimgError("conflict", `${o.what ?? key} is locked by ${describeHolder(a.holder)}`, {
        hint: "it is being built by that process; wait for it or pass a longer --wait (a lock whose process is gone is taken over automatically)",
        details: { lock: key, holder: a.holder },
      });
    }
    if (!waited) {
      waited = true;
      o.onWait?.(a.holder);
      log.info(`waiting for ${o.what ?? key}: locked by ${describeHolder(a.holder)}`);
    }
    await sleep(Math.min(delay, Math.max(1, deadline - Date.now())));
    delay = Math.min(delay * 2, 500);
  }
}

export async function withNamedLock<T>(db: Db, key: string, o: NamedLockOptions, fn: (lock: NamedLock) => Promise<T>): Promise<T> {
  const lock = await acquireNamedLock(db, key, o);
  try {
    return await fn(lock);
  } finally {
    lock.release();
  }
}
