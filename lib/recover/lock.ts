// One recover-pool at a time per pool directory: two runs racing would attach two loop devices to
// the same file or load the pool twice. The state dir's process lock guards a state dir, which a pool
// directory need not have, so this is the same flock (util/flock.ts) on DIR/.recover-pool.lock: the
// kernel drops it when its holder dies or the host reboots (recover-pool runs right after reboots).
import { join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { processStartTime } from "../lock/owner.ts";
import { log } from "../log.ts";
import { type Flock, readFlockRecord, tryFlock } from "../util/flock.ts";

export const LOCK_FILE = ".recover-pool.lock";

interface LockBody {
  pid: number;
  start_time: number | null;
  acquired_at: string;
  command: string;
}

function parseBody(text: string | null): LockBody | null {
  try {
    return text === null ? null : (JSON.parse(text) as LockBody);
  } catch {
    return null;
  }
}

export type DirLock = Pick<Flock, "release">;

export function lockDir(dir: string, command: string): DirLock {
  const path = join(dir, LOCK_FILE);
  const body: LockBody = { pid: process.pid, start_time: processStartTime(process.pid), acquired_at: new Date().toISOString(), command };
  const lock = tryFlock(path, { record: JSON.stringify(body), mode: 0o644 });
  if (!lock) {
    const held = parseBody(readFlockRecord(path));
    const who = held ? `pid ${held.pid}, ${held.command}, since ${held.acquired_at}` : "starting";
    throw new ThinimgError("conflict", `another recover-pool (${who}) holds ${path}`, {
      hint: "wait for it to finish; a lock whose process is gone is taken over automatically",
    });
  }
  const was = parseBody(lock.previous);
  if (was) log.warn(`taking over stale lock ${path}: pid ${was.pid} (${was.command}, since ${was.acquired_at}) is gone`);
  return lock;
}
