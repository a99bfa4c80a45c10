// One GC run, start to finish:
//   force: open the DB → take the process lock (or --ignore-lock: warn) → health checks must pass →
//          settle intents of dead processes → scan → plan → record first-seen unknown ids → act
//          (each orphan claimed by compare-and-set first) → repair the DB (compare-and-set) → report
//   dry-run: scan → plan → report; nothing is changed (the metadata snapshot is reserved and
//          released again: that is the only way to read a live pool's metadata).
// Scans happen BEFORE the DB is read: every pool change is recorded in the DB before it is made, so
// anything the scans saw that the DB does not know is not work in flight.
import { existsSync, readFileSync } from "node:fs";
import { useCommandJournal } from "../cmd-journal.ts";
import { type Config, DEFAULT_LOCK_WAIT_MS } from "../config.ts";
import { errorMessage, ThinimgError } from "../errors.ts";
import { acknowledgeOwnMessages, cursorOf, type KmsgCursor } from "../health/dmesg.ts";
import { assertHealthy } from "../health/index.ts";
import { procIo } from "../health/io.ts";
import { type ExclusiveHold, holdExclusive } from "../lock/holders.ts";
import { describeHolder, pidAlive, staleness } from "../lock/owner.ts";
import { acquireProcessLock, type ProcessLock, readLockFile } from "../lock/process-lock.ts";
import { log } from "../log.ts";
import { makeCtx } from "../pool/context.ts";
import { reconcilePending } from "../pool/journal.ts";
import { pausePoint } from "../pool/pause-points.ts";
import { type Db, openDb, tx } from "../store/db.ts";
import { actionWitnesses, forgetFirstSeen, type GcRows, readGcRows, recordFirstSeen, refsWitness } from "../store/gc-queries.ts";
import { type ActResult, act, STEP_TIMEOUT_MS } from "./act.ts";
import { buildDbView } from "./db-view.ts";
import { applyRepairs, storeLedger } from "./ledger.ts";
import type { DmScan, MetaScan, Plan } from "./model.ts";
import { mountsByDevice, readMountinfo } from "./mounts.ts";
import { makePlan } from "./plan.ts";
import { buildReport, type GcReport, type GcReportInput } from "./report.ts";
import { scanDm } from "./scan-dm.ts";
import { scanMeta } from "./scan-meta.ts";

export interface GcOptions {
  cfg: Config;
  force: boolean;
  graceMs: number;
  ignoreLock: boolean;
  /** How long to wait for the state dir's other holders (unpacks, activations, releases) to finish. */
  lockWaitMs?: number;
  stepTimeoutMs?: number;
  signal?: AbortSignal;
  command?: string;
}

export const GC_LOCK_WAIT_MS = DEFAULT_LOCK_WAIT_MS;

const EMPTY_ROWS: GcRows = { thinIds: [], layers: [], snapshots: [], devices: [], mounts: [], images: [], imageLayers: [], runningWork: [] };

function openForRun(cfg: Config, force: boolean): { db: Db | null; note: string | null } {
  if (force) return { db: openDb(cfg.dbPath), note: null };
  if (!existsSync(cfg.dbPath)) return { db: null, note: `no state database at ${cfg.dbPath}: nothing is known to thinimg` };
  try {
    return { db: openDb(cfg.dbPath, { readOnly: true }), note: null };
  } catch (e) {
    // a WAL database opened read-only needs its -shm; a read-write open only reads here
    log.debug(`read-only open failed (${errorMessage(e)}); opening read-write`);
    return { db: openDb(cfg.dbPath), note: null };
  }
}

export const alive = (pid: number, startTime: number | null, host: string | null) => {
  if (host === null) return pidAlive(pid);
  return !staleness({ pid, startTime, host }).stale;
};

/** The kernel has the device-mapper driver (a /dev/mapper/control node alone proves nothing). */
function dmInKernel(): boolean {
  try {
    return /\bdevice-mapper\b/.test(readFileSync("/proc/misc", "utf8"));
  } catch {
    return true; // no /proc: let dmsetup say what is wrong
  }
}

/**
 * The pre-flight checks as GC sees them: a full pool is what GC is for, so data use alone never
 * blocks it (out_of_data_space mode, needs_check, metadata use, a suspended pool, D-state, kernel
 * errors, memory and I/O pressure still do). Also returns the kernel-log cursor the check left.
 */
async function gcHealth(cfg: Config, timeoutMs: number): Promise<{ health: { ok: boolean; detail: string }; cursor: KmsgCursor | null }> {
  try {
    const h = await assertHealthy({
      pool: cfg.pool,
      stateDir: cfg.stateDir,
      thresholds: { dataBlockPct: 101 },
      kernelErrorWindowMs: cfg.kernelErrorWindowMs,
      timeoutMs,
    });
    return { health: { ok: true, detail: "health checks passed" }, cursor: cursorOf(h.checks.find((c) => c.name === "host.dmesg")) };
  } catch (e) {
    return { health: { ok: false, detail: e instanceof ThinimgError ? e.oneLine() : errorMessage(e) }, cursor: null };
  }
}

function unscannedMeta(detail: string): MetaScan {
  return {
    status: "skipped",
    method: null,
    ids: new Map(),
    blockBytes: 0,
    transactionId: null,
    staleHold: null,
    skipped: { reason: "unhealthy", detail },
    metaDev: null,
  };
}

type RunBase = Omit<GcReportInput, "finishedAt">;

function reportBase(o: GcOptions, startedAt: number, notes: string[]): RunBase {
  return {
    mode: o.force ? "force" : "dry_run",
    pool: o.cfg.pool,
    stateDir: o.cfg.stateDir,
    graceMs: o.graceMs,
    startedAt,
    lock: { status: "not_taken", holder: null },
    health: null,
    scan: { ours: 0, foreign: 0, unrelated: 0, metadata: { status: "skipped", method: null, thinIds: null, staleHold: null, skipped: null }, dbKnown: false },
    plan: null,
    act: null,
    repairsApplied: false,
    reconciled: 0,
    refused: null,
    kernelMessages: [],
    notes,
  };
}

function assertDmAvailable(): void {
  if (existsSync("/dev/mapper/control") && dmInKernel()) return;
  throw new ThinimgError("missing", "device-mapper is not available here (no dm driver in this kernel, or /dev/mapper/control missing)", {
    hint: "run gc on the host that has the pool (modprobe dm-thin-pool), as root",
  });
}

/** What --force holds while it runs; released in runGc's finally. */
interface Holds {
  hold: ExclusiveHold | null;
  lock: ProcessLock | null;
}

/** The state dir exclusively (no unpack, activation or release runs while GC acts), then the process
 * lock. Returns why the run is refused, or null; base.lock says what was taken. */
async function takeLocks(o: GcOptions, base: RunBase, holds: Holds): Promise<GcReportInput["refused"]> {
  const { cfg } = o;
  const waitMs = o.lockWaitMs ?? GC_LOCK_WAIT_MS;
  try {
    holds.hold = await holdExclusive(cfg.stateDir, { waitMs, ignoreLock: o.ignoreLock, command: o.command, what: "gc --force" });
  } catch (e) {
    base.lock = { status: "held", holder: errorMessage(e) };
    return { reason: "lock_held", detail: `${errorMessage(e)} (the next run retries; --ignore-lock overrides)` };
  }
  const hold = holds.hold;
  try {
    holds.lock = await acquireProcessLock(cfg.lockFile, { waitMs: o.ignoreLock ? 0 : waitMs, command: o.command });
    base.lock = hold.ignored.length ? { status: "ignored", holder: hold.ignored.map(describeHolder).join("; ") } : { status: "acquired", holder: null };
  } catch (e) {
    const holder = readLockFile(cfg.lockFile);
    const who = holder ? describeHolder(holder) : errorMessage(e);
    if (!o.ignoreLock) {
      base.lock = { status: "held", holder: who };
      return { reason: "lock_held", detail: `the process lock is held by ${who}; nothing was done (the next run retries; --ignore-lock overrides)` };
    }
    log.warn(`gc --ignore-lock: the process lock is held by ${who}; going ahead without it`);
    base.lock = { status: "ignored", holder: who };
  }
  return null;
}

/** --force before any scan: health must pass, then intents of processes that died are settled
 * (pending activations become orphans GC can see). Returns the kernel-log cursor, or why refused. */
async function forcePreflight(o: GcOptions, db: Db, base: RunBase, lock: ProcessLock | null, timeoutMs: number) {
  const h = await gcHealth(o.cfg, timeoutMs);
  base.health = h.health;
  if (!h.health.ok) return { refused: { reason: "unhealthy", detail: `health checks failed: ${h.health.detail}` }, cursor: null };
  if (lock) {
    try {
      base.reconciled = await reconcilePending(makeCtx(o.cfg, { db, command: o.command }));
    } catch (e) {
      base.notes.push(`settling interrupted work failed: ${errorMessage(e)}`);
    }
  }
  return { refused: null, cursor: h.cursor };
}

interface Scanned {
  dm: DmScan;
  meta: MetaScan;
  rows: GcRows;
  plan: Plan;
  scannedAt: number;
}

/** Scans, then the DB (see the top of this file), then the plan with its compare-and-set witnesses. */
async function scanAndPlan(o: GcOptions, db: Db | null, base: RunBase, releaseStale: boolean, timeoutMs: number): Promise<Scanned> {
  const { cfg } = o;
  const scannedAt = Date.now();
  const dm = await scanDm(cfg.pool, cfg.prefix, { timeoutMs });
  const entries = readMountinfo();
  const meta: MetaScan =
    base.health?.ok === false
      ? unscannedMeta(`health checks failed, metadata not read: ${base.health.detail}`)
      : await scanMeta(cfg.pool, { releaseStale, stateDir: cfg.stateDir, timeoutMs, poolTable: dm.pool.table });
  const rows = db ? readGcRows(db, cfg.pool) : EMPTY_ROWS;
  const { view, notes } = buildDbView(cfg.pool, rows, alive);
  base.notes.push(...notes);
  const dbMounts = view.mounts.map((m) => m.path);
  const mounts = mountsByDevice(dm.ours, entries, cfg.mountDir, dbMounts);
  const mountPoints = new Set(entries.map((e) => e.mountPoint));
  const plan = makePlan({ dm, meta, mounts, mountPoints, db: view, now: Date.now(), graceMs: o.graceMs, scannedAt });
  base.notes.push(...plan.notes);
  // compare-and-set witnesses: the rows each verdict was made from, checked again before acting
  const witness = actionWitnesses(rows);
  for (const a of plan.actions) a.witness = witness(a.thinId, a.device);
  for (const r of plan.repairs) r.witness = refsWitness(rows, r.refs);
  base.scan = {
    ours: dm.ours.length,
    foreign: dm.foreign.length,
    unrelated: dm.unrelated,
    metadata: {
      status: meta.status,
      method: meta.method,
      thinIds: meta.status === "ok" ? meta.ids.size : null,
      staleHold: meta.staleHold,
      skipped: meta.skipped ? `${meta.skipped.reason}: ${meta.skipped.detail}` : null,
    },
    dbKnown: view.known,
  };
  base.plan = plan;
  return { dm, meta, rows, plan, scannedAt };
}

/** Ids the DB has never heard of: their grace period counts from the first run that saw them. One
 * transaction: an fsync'd commit per sighted id would cost seconds at thousands of ids. */
function recordSightings(db: Db, pool: string, s: Scanned): void {
  tx(db, () => recordSightingsIn(db, pool, s));
}

function recordSightingsIn(db: Db, pool: string, s: Scanned): void {
  const { plan, meta, dm, rows } = s;
  const unknown = [...plan.actions, ...plan.skips].filter((x) => x.thinId !== null && ("orphanReason" in x ? x.orphanReason : x.reason) === "not_in_db");
  recordFirstSeen(
    db,
    pool,
    unknown.map((x) => x.thinId!),
    s.scannedAt,
  );
  if (meta.status !== "ok") return;
  const inPool = new Set([...meta.ids.keys(), ...dm.ours.flatMap((d) => (d.thin ? [d.thin.thinId] : []))]);
  const ledgerIds = new Set(rows.thinIds.map((t) => t.thin_id));
  forgetFirstSeen(db, pool, (id) => inPool.has(id) && !ledgerIds.has(id));
}

/** Kernel messages from unmounting devices this run then removed are ours, not the next run's. */
async function acknowledgeUnmounts(cfg: Config, base: RunBase, r: ActResult, cursor: KmsgCursor | null): Promise<void> {
  if (!r.unmountedRemoved.length) return;
  try {
    const lines = await acknowledgeOwnMessages(procIo, cfg.stateDir, new Set(r.unmountedRemoved), cursor);
    base.kernelMessages = lines;
    for (const l of lines) log.warn(`gc: the kernel said, unmounting a device this run then removed (not held against the next health check): ${l}`);
  } catch (e) {
    base.notes.push(`could not read the kernel log after acting: ${errorMessage(e)}`);
  }
}

/** --force after the plan: act on every orphan, then repair the DB unless the run stopped early. */
async function actAndRepair(o: GcOptions, db: Db, base: RunBase, s: Scanned, cursor: KmsgCursor | null, timeoutMs: number): Promise<ActResult> {
  const { cfg } = o;
  recordSightings(db, cfg.pool, s);
  await pausePoint("gc:planned", cfg.stateDir);
  const r = await act(s.plan.actions, {
    pool: cfg.pool,
    stepTimeoutMs: timeoutMs,
    ledger: storeLedger(db, cfg.pool, { alive }),
    scanned: new Map(s.dm.ours.map((d) => [d.name, d])),
    signal: o.signal,
    poolCheckedAt: s.meta.status === "ok" ? s.meta.statusAt : undefined,
  });
  await acknowledgeUnmounts(cfg, base, r, cursor);
  if (s.plan.repairs.length && !r.stopped) {
    const notApplied = applyRepairs(db, cfg.pool, s.plan.repairs);
    base.repairsApplied = true;
    base.repairsNotApplied = notApplied;
    if (notApplied.length)
      base.notes.push(`${notApplied.length} repair(s) not applied: their rows changed since the scan (work in flight); the next run looks again`);
  }
  return r;
}

export async function runGc(o: GcOptions): Promise<GcReport> {
  const { cfg } = o;
  useCommandJournal(cfg.stateDir);
  const notes: string[] = [];
  const base = reportBase(o, Date.now(), notes);
  const done = (extra: Partial<GcReportInput>) => buildReport({ ...base, ...extra, notes, finishedAt: Date.now() });
  const timeoutMs = o.stepTimeoutMs ?? STEP_TIMEOUT_MS;
  assertDmAvailable();
  const opened = openForRun(cfg, o.force);
  const db = opened.db;
  if (opened.note) notes.push(opened.note);
  const holds: Holds = { hold: null, lock: null };
  try {
    let cursor: KmsgCursor | null = null;
    if (o.force && db) {
      const refused = await takeLocks(o, base, holds);
      if (refused) return done({ refused });
      const pre = await forcePreflight(o, db, base, holds.lock, timeoutMs);
      if (pre.refused) return done({ refused: pre.refused });
      cursor = pre.cursor;
    }
    // dry-run: the same checks, before any metadata snapshot is reserved; an unhealthy pool gets a
    // report from dmsetup alone
    if (!o.force) base.health = (await gcHealth(cfg, timeoutMs)).health;
    const scanned = await scanAndPlan(o, db, base, o.force && holds.lock !== null, timeoutMs);
    const actResult = o.force && db ? await actAndRepair(o, db, base, scanned, cursor, timeoutMs) : null;
    return done({ act: actResult });
  } finally {
    holds.lock?.release();
    holds.hold?.release();
    db?.close();
  }
}
