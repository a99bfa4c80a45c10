// Reading a live pool's metadata: reserve_metadata_snap → thin_ls/thin_dump on the snapshot →
// release_metadata_snap. A pool has ONE snapshot slot, so readers must not interleave: two of them
// would read (or release!) each other's snapshot. Every thinimg reader — GC's scan, the pipeline's
// settling of unproven creates — therefore:
//   1. takes an exclusive flock(2) on `<state dir>/metadata-snap.lock` (the kernel drops a flock when
//      its process dies, so the holder is always a live process);
//   2. looks for a hold already there: under the lock it is not a live thinimg reader's, but it may
//      be a hand-run thin_ls. It counts as stale only once it stays unchanged for a quiet period with
//      no thin-provisioning tool reading the metadata device; a hold that goes away or changes by
//      itself belonged to a live reader;
//   3. reserves, remembers the root it got, and releases only while the pool still shows that root.
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { acquireFlock, type Flock } from "../util/flock.ts";
import * as dmsetup from "./dmsetup.ts";
import { parsePoolTable, poolStatusOk, releaseMetadataSnap, reserveMetadataSnap } from "./pool.ts";
import type { PoolStatusOk } from "./status.ts";

export const META_LOCK_FILE = "metadata-snap.lock";
export const META_LOCK_WAIT_MS = 10_000;

export type MetaLock = Flock;

/**
 * Take the metadata-snapshot lock of a state dir, waiting up to waitMs. null: another live process
 * holds it (a reader is active). A state dir that does not exist has no thinimg readers: a no-op lock.
 */
export async function acquireMetaLock(stateDir: string, waitMs = META_LOCK_WAIT_MS): Promise<MetaLock | null> {
  const path = join(stateDir, META_LOCK_FILE);
  if (!existsSync(stateDir)) return { path, previous: null, release() {} };
  return acquireFlock(path, waitMs);
}

/** "7:0" (thin-pool tables name their devices so) → a path that opens that block device, or null. */
export function devPathFor(majorMinor: string, o: { dev?: string; sys?: string } = {}): string | null {
  const dev = o.dev ?? "/dev";
  const sys = o.sys ?? "/sys";
  if (!/^\d+:\d+$/.test(majorMinor)) return majorMinor.startsWith("/") ? majorMinor : null;
  const link = `${dev}/block/${majorMinor}`;
  if (existsSync(link)) return link;
  try {
    const m = /^DEVNAME=(.+)$/m.exec(readFileSync(`${sys}/dev/block/${majorMinor}/uevent`, "utf8"));
    if (m && !m[1]!.includes("..")) return `${dev}/${m[1]!.trim()}`;
  } catch {
    // fall through: unknown device
  }
  return null;
}

function sameBlockDevice(a: string, b: string): boolean {
  try {
    const sa = statSync(a);
    return sa.isBlockDevice() && sa.rdev === statSync(b).rdev;
  } catch {
    return false;
  }
}

/** A running thin-provisioning tool reading this metadata device (the only thing that reads a metadata snapshot), or null. */
export function liveMetadataReader(metaDev: string, procDir = "/proc"): string | null {
  let pids: string[];
  try {
    pids = readdirSync(procDir).filter((p) => /^\d+$/.test(p));
  } catch {
    return null;
  }
  for (const pid of pids) {
    let argv: string[];
    try {
      argv = readFileSync(`${procDir}/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
    } catch {
      continue;
    }
    const exe = basename(argv[0] ?? "");
    if (/^(thin_\w+|pdata_tools)$/.test(exe) && argv.some((a) => a === metaDev || (a.startsWith("/") && sameBlockDevice(a, metaDev)))) {
      return `pid ${pid} (${argv.join(" ").slice(0, 200)})`;
    }
  }
  return null;
}

export type HeldSnapshot = { kind: "none" } | { kind: "stale"; root: number } | { kind: "busy"; root: number; reader: string | null };

export interface HoldOptions {
  /** How long a hold must stay unchanged, with no metadata tool running, before it counts as stale. */
  quietMs?: number;
  /** Give up waiting for a live reader after this long ("busy"). */
  maxWaitMs?: number;
  /** Per-command timeout (ms). */
  timeoutMs?: number;
}

/**
 * Call with the metadata-snapshot lock held: is a snapshot held already, and is its holder gone?
 * `status` is the last pool status it read (callers need not read it again).
 */
export async function inspectHold(pool: string, metaDev: string, o: HoldOptions = {}): Promise<HeldSnapshot & { status: PoolStatusOk }> {
  const quietMs = o.quietMs ?? 3_000;
  const deadline = Date.now() + (o.maxWaitMs ?? 60_000);
  const q = { timeoutMs: o.timeoutMs ?? 10_000, ctx: { pool_name: pool } };
  let status = await poolStatusOk(pool, q);
  let held = status.heldRoot;
  if (held === null) return { kind: "none", status };
  let quietSince = Date.now();
  for (;;) {
    const reader = liveMetadataReader(metaDev);
    if (reader) quietSince = Date.now();
    else if (Date.now() - quietSince >= quietMs) return { kind: "stale", root: held, status };
    if (Date.now() >= deadline) return { kind: "busy", root: held, reader, status };
    await Bun.sleep(250);
    status = await poolStatusOk(pool, q);
    const now = status.heldRoot;
    if (now === null) return { kind: "none", status }; // its live holder released it
    if (now !== held) {
      held = now;
      quietSince = Date.now();
    }
  }
}

/** Release a hold inspectHold() found stale (a reader died holding it; left alone, every later reserve fails). */
export async function releaseStaleHold(pool: string, root: number, timeoutMs = 10_000): Promise<void> {
  log.warn(
    `pool ${pool}: releasing a stale metadata snapshot (held root ${root}): its reader is gone (no thinimg reader holds the lock, no metadata tool is running)`,
  );
  await releaseMetadataSnap(pool, { timeoutMs, ctx: { pool_name: pool } });
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

export interface MetaSnapOptions extends HoldOptions {
  stateDir: string;
  /** How long to wait for another thinimg reader to finish. */
  lockWaitMs?: number;
  /** Release a stale hold found first (else: a conflict error naming it). */
  releaseStale?: boolean;
}

/** The pool's metadata device, as a path. */
export async function metadataDevice(pool: string, timeoutMs = 10_000): Promise<string> {
  const pt = parsePoolTable((await dmsetup.table(pool, { timeoutMs, ctx: { pool_name: pool } })).split("\n")[0] ?? "");
  const metaDev = devPathFor(pt.metaDev);
  if (!metaDev) throw new ThinimgError("missing", `pool ${pool}: no device node for its metadata device ${pt.metaDev}`);
  return metaDev;
}

/**
 * reserve_metadata_snap → fn(metadata device) → release_metadata_snap, under the state dir's
 * metadata-snapshot lock. Throws `conflict` when another reader keeps the lock or the snapshot
 * longer than allowed, or (without releaseStale) when a stale hold is in the way.
 */
export async function withMetadataSnapshot<T>(pool: string, o: MetaSnapOptions, fn: (metaDev: string) => Promise<T>): Promise<T> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const lock = await acquireMetaLock(o.stateDir, o.lockWaitMs ?? META_LOCK_WAIT_MS);
  if (!lock) {
    throw new ThinimgError("conflict", `pool ${pool}: another thinimg process is reading a metadata snapshot (${join(o.stateDir, META_LOCK_FILE)})`, {
      hint: "retry in a moment",
    });
  }
  try {
    const metaDev = await metadataDevice(pool, timeoutMs);
    const hold = await inspectHold(pool, metaDev, o);
    if (hold.kind === "busy") {
      throw new ThinimgError("conflict", `pool ${pool} holds a metadata snapshot (root ${hold.root}) that ${hold.reader ?? "someone"} is still reading`, {
        hint: "wait for it to finish, then re-run",
      });
    }
    if (hold.kind === "stale") {
      if (!o.releaseStale) {
        throw new ThinimgError("conflict", `pool ${pool} holds a stale metadata snapshot (root ${hold.root})`, {
          hint: "`bun scripts/gc.ts --force` releases it",
        });
      }
      await releaseStaleHold(pool, hold.root, timeoutMs);
    }
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
