// flock(2) through bun:ffi (node:fs has none). The kernel drops a flock when its process dies, so a
// holder is always a live process: no stale-lock handling needed.
import { closeSync, openSync } from "node:fs";
import { dlopen, FFIType } from "bun:ffi";

const LOCK_EX = 2;
const LOCK_NB = 4;
const LOCK_UN = 8;

type Lib = ReturnType<typeof openLib>;
function openLib() {
  return dlopen("libc.so.6", { flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 } });
}
let lib: Lib | null = null;

export interface Flock {
  path: string;
  release(): void;
}

/** Take an exclusive flock on `path` (created 0600), polling up to waitMs. null: still held by another process. */
export async function acquireFlock(path: string, waitMs: number): Promise<Flock | null> {
  lib ??= openLib();
  const fd = openSync(path, "a", 0o600);
  const deadline = Date.now() + waitMs;
  let delay = 25;
  for (;;) {
    if (lib.symbols.flock(fd, LOCK_EX | LOCK_NB) === 0) {
      let held = true;
      return {
        path,
        release() {
          if (!held) return;
          held = false;
          lib!.symbols.flock(fd, LOCK_UN);
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
