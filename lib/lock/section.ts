// A "pool section": a short sequence that changes the pool (intent → message(s) → transaction id →
// record). Serialized in-process by a queue (two async paths must not interleave their transaction
// id reads) and across processes by the process lock file. Do not nest sections: the queue is not
// re-entrant.
import { SerialQueue } from "../util/serial-queue.ts";
import { type ProcessLockOptions, withProcessLock } from "./process-lock.ts";

const sectionQueue = new SerialQueue();

export function poolSection<T>(lockFile: string, o: ProcessLockOptions, fn: () => Promise<T>): Promise<T> {
  return sectionQueue.run(() => withProcessLock(lockFile, o, fn));
}
