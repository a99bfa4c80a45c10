// One metadata-snapshot reader at a time per state dir. A pool has a single metadata snapshot slot:
// two readers interleaving reserve → read → release would read (or release!) each other's snapshot.
// Every thinimg reader — GC's scan, the pipeline's settling of unproven creates — takes an exclusive
// flock(2) on `<state dir>/metadata-snap.lock` around reserve → read → release. The kernel drops a
// flock when its process dies, so a holder is always a live process: a snapshot found held while we
// hold the lock was left by a dead reader (or by something that is not thinimg) — never by a live
// thinimg reader.
//
// Use withMetadataSnapshot() for any reader: it takes the lock, reserves, remembers the root it got,
// runs the reader with the metadata device, and releases only a snapshot that is still its own.
import { closeSync, existsSync, openSync } from "node:fs";
import { join } from "node:path";
import { dlopen, FFIType } from "bun:ffi";
import * as dmsetup from "../dm/dmsetup.ts";
import { parsePoolTable, poolStatusOk, releaseMetadataSnap, reserveMetadataSnap } from "../dm/pool.ts";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { devPathFor } from "./scan-meta.ts";

const LOCK_EX = 2;
const LOCK_NB = 4;
const LOCK_UN = 8;

type Lib = ReturnType<typeof openLib>;
function openLib() {
  return dlopen("libc.so.6", { flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 } });
}
let lib: Lib | null = null;

export const META_LOCK_FILE = "metadata-snap.lock";
export const META_LOCK_WAIT_MS = 10_000;

export interface MetaLock {
  path: string;
  release(): void;
}

/**
 * Take the metadata-snapshot lock of a state dir, waiting up to waitMs. null: another live process
 * holds it (a reader is active). A state dir that does not exist has no thinimg readers: a no-op lock.
 */
export async function acquireMetaLock(stateDir: string, waitMs = META_LOCK_WAIT_MS): Promise<MetaLock | null> {
  const path = join(stateDir, META_LOCK_FILE);
  if (!existsSync(stateDir)) return { path, release() {} };
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

export interface MetaSnapOptions {
  stateDir: string;
  /** Per-command timeout (ms). */
  timeoutMs?: number;
  /** How long to wait for another thinimg reader to finish. */
  lockWaitMs?: number;
}

/**
 * reserve_metadata_snap → fn(metadata device) → release_metadata_snap, under the state dir's
 * metadata-snapshot lock. The release happens only if the pool still shows the root we reserved
 * (never someone else's). Throws when another reader keeps the lock for longer than lockWaitMs, or
 * when the pool already holds a snapshot (a dead reader's: GC reports and releases those).
 *
 * For the pipeline: `withMetadataSnapshot(poolName, { stateDir: ctx.cfg.stateDir }, (meta) =>
 * thinLs(meta, { metadataSnap: true }))` is what readPoolThinIds() does today without the lock.
 */
export async function withMetadataSnapshot<T>(pool: string, o: MetaSnapOptions, fn: (metaDev: string) => Promise<T>): Promise<T> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const ctx = { pool_name: pool };
  const lock = await acquireMetaLock(o.stateDir, o.lockWaitMs ?? META_LOCK_WAIT_MS);
  if (!lock) {
    throw new ThinimgError("conflict", `pool ${pool}: another thinimg process is reading a metadata snapshot (${join(o.stateDir, META_LOCK_FILE)})`, {
      hint: "retry in a moment",
    });
  }
  try {
    const pt = parsePoolTable((await dmsetup.table(pool, { timeoutMs, ctx })).split("\n")[0] ?? "");
    const metaDev = devPathFor(pt.metaDev);
    if (!metaDev) throw new ThinimgError("missing", `pool ${pool}: no device node for its metadata device ${pt.metaDev}`);
    const root = await reserveOwn(pool, timeoutMs);
    try {
      return await fn(metaDev);
    } finally {
      await releaseOwn(pool, root, timeoutMs);
    }
  } finally {
    lock.release();
  }
}

/** Reserve and return the held root the pool now shows (ours: we hold the lock). */
export async function reserveOwn(pool: string, timeoutMs: number): Promise<number | null> {
  const ctx = { pool_name: pool };
  await reserveMetadataSnap(pool, { timeoutMs, ctx });
  return (await poolStatusOk(pool, { timeoutMs, ctx })).heldRoot;
}

/** Release the snapshot only if the pool still shows the root we reserved. Never throws. */
export async function releaseOwn(pool: string, root: number | null, timeoutMs: number): Promise<void> {
  const ctx = { pool_name: pool };
  try {
    const now = (await poolStatusOk(pool, { timeoutMs, ctx })).heldRoot;
    if (now === null) {
      log.warn(`pool ${pool}: our metadata snapshot (root ${root}) was already released by someone else`);
      return;
    }
    if (root !== null && now !== root) {
      log.warn(`pool ${pool}: the held metadata snapshot is root ${now}, not ours (${root}): left alone`);
      return;
    }
    await releaseMetadataSnap(pool, { timeoutMs, ctx });
  } catch (e) {
    // the next gc run sees the hold in the status line and reports it
    log.error(`pool ${pool}: release_metadata_snap failed: ${(e as Error).message}; the next gc run will report a stale hold`);
  }
}
