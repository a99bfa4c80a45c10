// An exclusive flock(2) on a file, waited for with a bound. The kernel drops a flock when its process
// dies, so a holder is always a live process: no stale-lock handling needed.
import { closeSync, openSync } from "node:fs";
import { tryFlockExclusive, unflock } from "./libc.ts";

export interface Flock {
  path: string;
  release(): void;
}

/** Take an exclusive flock on `path` (created 0600), polling up to waitMs. null: still held by another process. */
export async function acquireFlock(path: string, waitMs: number): Promise<Flock | null> {
  const fd = openSync(path, "a", 0o600);
  const deadline = Date.now() + waitMs;
  let delay = 25;
  for (;;) {
    if (tryFlockExclusive(fd)) {
      let held = true;
      return {
        path,
        release() {
          if (!held) return;
          held = false;
          unflock(fd);
          closeSync(fd);
        },
      };
    }
    if (Date.now() >= deadline) {
      closeSync(fd);
      return null;
    }
    await Bun.sleep(Math.min(delay, Math.max(1, deadline - Date.now())));
    delay = Math.min(delay * 2, 250);
  }
}
