// Thin ids in the pool's metadata — the only way to see inactive leaks (ids no dm device shows).
// The pool is live, so we read a metadata *snapshot*: reserve_metadata_snap → thin_ls (or thin_dump)
// on it → release_metadata_snap, the release always in `finally`. A snapshot already held when we
// look while we hold the state dir's metadata-snapshot lock (meta-lock.ts: every thinimg reader takes
// it), and still there a few seconds later, means a reader died holding it (or someone reads by hand):
// reported, released only when the caller says so (--force and the process lock is ours). Our own
// snapshot is released only while the pool still shows the root we reserved.
import { existsSync, readFileSync } from "node:fs";
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { parsePoolTable, poolStatusOk, releaseMetadataSnap, SECTOR } from "../dm/pool.ts";
import { parseThinDumpIds, thinDump, thinLs } from "../dm/thintools.ts";
import { errorMessage } from "../errors.ts";
import { log } from "../log.ts";
import { acquireMetaLock, META_LOCK_FILE, META_LOCK_WAIT_MS, releaseOwn, reserveOwn } from "./meta-lock.ts";
import type { MetaScan } from "./model.ts";

/** "7:0" → a path that opens that block device. */
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

export interface ScanMetaOptions {
  /** Release a snapshot that was already held (caller owns the process lock and runs --force). */
  releaseStale: boolean;
  /** State dir: its metadata-snapshot lock (meta-lock.ts) is held around reserve → read → release. */
  stateDir?: string;
  /** Per-command timeout (ms). */
  timeoutMs?: number;
  /** How long a hold found at the start may take to go away by itself before it counts as stale. */
  heldWaitMs?: number;
  /** How long to wait for another thinimg reader's metadata-snapshot lock. */
  lockWaitMs?: number;
}

export async function scanMeta(pool: string, o: ScanMetaOptions): Promise<MetaScan> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const ctx = { pool_name: pool };
  const pt = parsePoolTable((await dmsetup.table(pool, { timeoutMs, ctx })).split("\n")[0] ?? "");
  const blockBytes = pt.blockSectors * SECTOR;
  const metaDev = devPathFor(pt.metaDev);
  const base: MetaScan = { status: "skipped", method: null, ids: new Map(), blockBytes, transactionId: null, staleHold: null, skipped: null, metaDev };
  if (!metaDev) {
    return { ...base, skipped: { reason: "scan_failed", detail: `cannot find a device node for the pool's metadata device ${pt.metaDev}` } };
  }
  // one thinimg reader at a time: a live reader's snapshot is never mistaken for a stale one
  const lock = o.stateDir ? await acquireMetaLock(o.stateDir, o.lockWaitMs ?? META_LOCK_WAIT_MS) : { release() {} };
  if (!lock) {
    return {
      ...base,
      skipped: { reason: "metadata_snap_busy", detail: `pool ${pool}: another thinimg process is reading a metadata snapshot (it holds ${META_LOCK_FILE}); next run` },
    };
  }
  try {
    return await scanLocked(pool, o, base, timeoutMs);
  } finally {
    lock.release();
  }
}

async function scanLocked(pool: string, o: ScanMetaOptions, base: MetaScan, timeoutMs: number): Promise<MetaScan> {
  const ctx = { pool_name: pool };
  const metaDev = base.metaDev!;
  let st = await poolStatusOk(pool, { timeoutMs, ctx });
  if (st.heldRoot !== null && (o.heldWaitMs ?? 3_000) > 0) {
    // no thinimg reader is active (we hold the lock), but a hand-run thin_ls may be: give it time
    const first = st.heldRoot;
    const until = Date.now() + (o.heldWaitMs ?? 3_000);
    while (st.heldRoot === first && Date.now() < until) {
      await Bun.sleep(250);
      st = await poolStatusOk(pool, { timeoutMs, ctx });
    }
  }
  base.transactionId = st.transactionId;
  if (st.mode !== "rw" || st.needsCheck) {
    // a read-only pool refuses reserve_metadata_snap (EOPNOTSUPP); GC will not act on it anyway
    return { ...base, skipped: { reason: "pool_not_rw", detail: `pool ${pool} is ${st.needsCheck ? "flagged needs_check" : `in ${st.mode} mode`}: its metadata cannot be snapshotted` } };
  }
  if (st.heldRoot !== null) {
    if (!o.releaseStale) {
      return {
        ...base,
        staleHold: { heldRoot: st.heldRoot, released: false },
        skipped: {
          reason: "stale_metadata_snap",
          detail: `pool ${pool} already holds a metadata snapshot (root ${st.heldRoot}) and no thinimg reader is active: a previous run died holding it, or someone reads it by hand; inactive leaks not scanned`,
        },
      };
    }
    log.warn(`pool ${pool}: releasing a stale metadata snapshot (root ${st.heldRoot}); no thinimg reader holds the metadata-snapshot lock`);
    await releaseMetadataSnap(pool, { timeoutMs, ctx });
    base.staleHold = { heldRoot: st.heldRoot, released: true };
  }

  let root: number | null;
  try {
    root = await reserveOwn(pool, timeoutMs);
  } catch (e) {
    // someone outside thinimg reserved between our status and our reserve
    if (isDmError(e, "busy") || isDmError(e, "exists")) {
      return { ...base, skipped: { reason: "metadata_snap_busy", detail: `pool ${pool}: metadata snapshot taken by someone else: ${errorMessage(e)}` } };
    }
    if (isDmError(e, "timeout")) throw e;
    return { ...base, skipped: { reason: "scan_failed", detail: `reserve_metadata_snap failed: ${errorMessage(e)}` } };
  }
  try {
    try {
      const entries = await thinLs(metaDev, { metadataSnap: true, timeoutMs: 60_000, ctx });
      return { ...base, status: "ok", method: "thin_ls", ids: new Map(entries.map((e) => [e.id, e.mappedBlocks])) };
    } catch (e) {
      log.warn(`thin_ls failed (${errorMessage(e)}); falling back to thin_dump`);
    }
    try {
      const ids = parseThinDumpIds(await thinDump(metaDev, { metadataSnap: true, timeoutMs: 60_000, ctx }));
      return { ...base, status: "ok", method: "thin_dump", ids: new Map(ids.map((id) => [id, null])) };
    } catch (e) {
      return { ...base, skipped: { reason: "scan_failed", detail: `reading the metadata snapshot failed: ${errorMessage(e)}` } };
    }
  } finally {
    // only our own snapshot: the root we reserved, if the pool still shows it
    await releaseOwn(pool, root, timeoutMs);
  }
}
