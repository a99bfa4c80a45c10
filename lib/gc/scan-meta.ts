// Thin ids in the pool's metadata — the only way to see inactive leaks (ids no dm device shows).
// The pool is live, so we read a metadata *snapshot*, with the rules every thinimg reader follows
// (lib/dm/metadata-snap.ts): the state dir's metadata-snapshot lock around reserve → thin_ls (or
// thin_dump) → release, the release always in `finally` and only of the root we reserved. A hold
// already there that stays put with no reader running means a reader died holding it: reported,
// released only when the caller says so (--force and the process lock is ours).
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { acquireMetaLock, devPathFor, inspectHold, META_LOCK_FILE, META_LOCK_WAIT_MS, releaseOwn, releaseStaleHold, reserveOwn } from "../dm/metadata-snap.ts";
import { parsePoolTable, SECTOR } from "../dm/pool.ts";
import { parseThinDumpIds, thinDump, thinLs } from "../dm/thintools.ts";
import { errorMessage } from "../errors.ts";
import { log } from "../log.ts";
import type { MetaScan } from "./model.ts";

export interface ScanMetaOptions {
  /** Release a snapshot that was already held (caller owns the process lock and runs --force). */
  releaseStale: boolean;
  /** State dir: its metadata-snapshot lock (meta-lock.ts) is held around reserve → read → release. */
  stateDir?: string;
  /** Per-command timeout (ms): GC's per-operation limit, thin_ls and thin_dump included. */
  timeoutMs?: number;
  /** How long a hold found at the start may take to go away by itself before it counts as stale. */
  heldWaitMs?: number;
  /** How long to wait for another thinimg reader's metadata-snapshot lock. */
  lockWaitMs?: number;
  /** The pool's table as the device scan just read it (saves reading it again). */
  poolTable?: string | null;
}

export async function scanMeta(pool: string, o: ScanMetaOptions): Promise<MetaScan> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const ctx = { pool_name: pool };
  const table = o.poolTable ?? (await dmsetup.table(pool, { timeoutMs, ctx }));
  const pt = parsePoolTable(table.split("\n")[0] ?? "");
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
      skipped: {
        reason: "metadata_snap_busy",
        detail: `pool ${pool}: another thinimg process is reading a metadata snapshot (it holds ${META_LOCK_FILE}); next run`,
      },
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
  // no thinimg reader is active (we hold the lock), but a hand-run thin_ls may be: give it time
  const quietMs = o.heldWaitMs ?? 3_000;
  const hold = await inspectHold(pool, metaDev, { quietMs, maxWaitMs: quietMs + 10_000, timeoutMs });
  const st = hold.status;
  base.transactionId = st.transactionId;
  if (st.mode !== "rw" || st.needsCheck) {
    // a read-only pool refuses reserve_metadata_snap (EOPNOTSUPP); GC will not act on it anyway
    return {
      ...base,
      skipped: {
        reason: "pool_not_rw",
        detail: `pool ${pool} is ${st.needsCheck ? "flagged needs_check" : `in ${st.mode} mode`}: its metadata cannot be snapshotted`,
      },
    };
  }
  // ok (not Fail/Error: poolStatusOk), rw, not needs_check: it also serves as act's first pool check
  base.statusAt = performance.now();
  if (hold.kind === "busy") {
    return {
      ...base,
      skipped: {
        reason: "metadata_snap_busy",
        detail: `pool ${pool}: its metadata snapshot (root ${hold.root}) is being read by ${hold.reader ?? "someone"}; next run`,
      },
    };
  }
  if (hold.kind === "stale") {
    if (!o.releaseStale) {
      return {
        ...base,
        staleHold: { heldRoot: hold.root, released: false },
        skipped: {
          reason: "stale_metadata_snap",
          detail: `pool ${pool} already holds a metadata snapshot (root ${hold.root}) and no thinimg reader is active: a previous run died holding it, or someone reads it by hand; inactive leaks not scanned`,
        },
      };
    }
    await releaseStaleHold(pool, hold.root, timeoutMs);
    base.staleHold = { heldRoot: hold.root, released: true };
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
      const entries = await thinLs(metaDev, { metadataSnap: true, timeoutMs, ctx });
      return { ...base, status: "ok", method: "thin_ls", ids: new Map(entries.map((e) => [e.id, e.mappedBlocks])) };
    } catch (e) {
      log.warn(`thin_ls failed (${errorMessage(e)}); falling back to thin_dump`);
    }
    try {
      const ids = parseThinDumpIds(await thinDump(metaDev, { metadataSnap: true, timeoutMs, ctx }));
      return { ...base, status: "ok", method: "thin_dump", ids: new Map(ids.map((id) => [id, null])) };
    } catch (e) {
      return { ...base, skipped: { reason: "scan_failed", detail: `reading the metadata snapshot failed: ${errorMessage(e)}` } };
    }
  } finally {
    // only our own snapshot: the root we reserved, if the pool still shows it
    await releaseOwn(pool, root, timeoutMs);
  }
}
