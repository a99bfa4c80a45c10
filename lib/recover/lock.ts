// One recover-pool at a time per pool directory: two runs racing would attach two loop devices to
// the same file or load the pool twice. The state dir's process lock (lib/lock) needs the state DB,
// which a pool directory does not have, so this is a plain O_EXCL lock file holding the owner (PID,
// start time — lib/lock/owner.ts — and the boot id, since recover-pool runs right after reboots, when
// PIDs and start times repeat). A lock left by a crash or a previous boot is taken over.
import { closeSync, openSync, readFileSync, statSync, unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { pidAlive, processStartTime } from "../lock/owner.ts";
import { log } from "../log.ts";

export const LOCK_FILE = ".recover-pool.lock";

interface LockBody {
  pid: number;
  start_time: number | null;
  boot_id: string | null;
  acquired_at: string;
  command: string;
}

function bootId(): string | null {
  try {
    return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
  } catch {
    return null;
  }
}

/** Why a recorded holder is gone, or null when it may still be running. */
export function staleReason(b: LockBody, currentBoot = bootId()): string | null {
  if (b.boot_id && currentBoot && b.boot_id !== currentBoot) return "taken in a previous boot";
  if (!pidAlive(b.pid)) return `pid ${b.pid} is not running`;
  const st = processStartTime(b.pid);
  if (b.start_time !== null && st !== null && st !== b.start_time) return `pid ${b.pid} was reused`;
  return null;
}

export interface DirLock {
  release(): void;
}

export function lockDir(dir: string, command: string): DirLock {
  const path = join(dir, LOCK_FILE);
  const body: LockBody = {
    pid: process.pid,
    start_time: processStartTime(process.pid),
    boot_id: bootId(),
    acquired_at: new Date().toISOString(),
    command,
  };
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = openSync(path, "wx", 0o644);
      try {
        writeSync(fd, `${JSON.stringify(body)}\n`);
      } finally {
        closeSync(fd);
      }
      return {
        release() {
          try {
            unlinkSync(path);
          } catch {}
        },
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    let held: LockBody | null = null;
    try {
      held = JSON.parse(readFileSync(path, "utf8")) as LockBody;
    } catch {
      // empty or torn: a writer between create and write (young file), or one that died there
      let young = false;
      try {
        young = Date.now() - statSync(path).mtimeMs < 5_000;
      } catch {}
      if (young) throw new ThinimgError("conflict", `another recover-pool is taking ${path}`, { hint: "retry in a few seconds" });
    }
    const why = held ? staleReason(held) : "lock file unreadable";
    if (held && why === null) {
      throw new ThinimgError("conflict", `another recover-pool (pid ${held.pid}, ${held.command}, since ${held.acquired_at}) holds ${path}`, {
        hint: "wait for it to finish; a lock whose process is gone is taken over automatically",
      });
    }
    log.warn(`taking over stale lock ${path}: ${why}`);
    try {
      unlinkSync(path);
    } catch {}
  }
  throw new ThinimgError("conflict", `could not take ${path}`, { hint: "another recover-pool keeps taking it; retry" });
}
