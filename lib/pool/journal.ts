// Pool changes with a crash record. Inside a pool section (process lock + in-process queue):
//   1. read the pool's transaction id T
//   2. write the intent (step row: op, thin id, T → T+1)            ← BEFORE the pool changes
//   3. send create_thin / create_snap
//   4. set_transaction_id T T+1                                     ← the pool now says "3 happened"
//   5. mark the step done and the thin id created
// After a crash, reconcilePending() compares the pool's transaction id with the step: T+1 means the
// create happened; T means it may or may not have (crash between 3 and 4) — the pool's metadata
// (read from a metadata snapshot) decides: absent → the id stays 'allocated' and its owner creates
// the SAME id; present → recorded orphaned (never adopted blindly) and the next id taken. A create
// whose outcome is unknown to a live process (a timeout) is left pending the same way. Nothing is
// ever done twice.

import { DmError, isDmError } from "../dm/errors.ts";
import { type HoldOptions, withMetadataSnapshot } from "../dm/metadata-snap.ts";
import * as pool from "../dm/pool.ts";
import type { PoolStatusOk } from "../dm/status.ts";
import { thinLs } from "../dm/thintools.ts";
import { ThinimgError } from "../errors.ts";
import { isSelf, staleness } from "../lock/owner.ts";
import { poolSection } from "../lock/section.ts";
import { log } from "../log.ts";
import { type Db, tx } from "../store/db.ts";
import { listDevices, setDeviceState } from "../store/devices.ts";
import { parseWorkSubject } from "../store/keys.ts";
import { listSnapshots, updateSnapshot } from "../store/snapshots.ts";
import { getThinId, recordOrphanThinId, setThinIdState } from "../store/thin-ids.ts";
import { beginStep, endStep, finishWork, intentOwners, listWork, pendingSteps, type StepRow, type WorkRow } from "../store/work.ts";
import type { Ctx } from "./context.ts";
import { pausePoint } from "./pause-points.ts";

export type PoolOp = { op: "create_thin"; thinId: number } | { op: "create_snap"; thinId: number; originId: number };

/** The id already exists in the pool (recorded as orphaned); the caller allocates the next one. */
export class ThinIdTaken extends Error {
  constructor(readonly thinId: number) {
    super(`thin id ${thinId} already exists in the pool`);
  }
}

/** Run fn as a pool section; pending intents of dead processes are reconciled first. */
export function inPoolSection<T>(ctx: Ctx, fn: () => Promise<T>): Promise<T> {
  return poolSection(ctx.cfg.lockFile, { waitMs: ctx.cfg.lockWaitMs, command: ctx.owner.command }, async () => {
    await reconcilePending(ctx);
    return fn();
  });
}

/** Pool status that allows changes: usable and read-write. */
export async function writablePool(ctx: Ctx): Promise<PoolStatusOk> {
  const st = await pool.poolStatusOk(ctx.cfg.pool);
  if (st.mode !== "rw") {
    throw new ThinimgError("unhealthy", `pool ${ctx.cfg.pool} is ${st.mode === "ro" ? "read-only" : "out of data space"}; no pool changes are made`, {
      hint: "run `bun scripts/health.ts`, free space with `bun scripts/gc.ts --force` or extend the pool (docs/ops-recover-pool.md)",
    });
  }
  if (st.needsCheck) {
    throw new ThinimgError("unhealthy", `pool ${ctx.cfg.pool} has needs_check set`, { hint: "follow docs/ops-recover-pool.md (thin_check)" });
  }
  return st;
}

/** The intent row of a create (step 2 above), to be written in the caller's own transaction. */
export function beginCreateStep(db: Db, pool: string, workId: number, req: PoolOp, T: number | null = null): StepRow {
  return beginStep(db, workId, pool, req.op, {
    thinId: req.thinId,
    originThinId: req.op === "create_snap" ? req.originId : null,
    txnBefore: T,
    txnAfter: T === null ? null : T + 1,
  });
}

export interface PoolCreateOptions {
  /** false skips steps 1 and 4 (activations: an interrupted activation is never resumed, its id is
   * recorded orphaned whether or not the create ran, so the crash record would change nothing — and
   * it would double the dm commands on the activation hot path). A read-only or full pool then shows
   * up as the create's own error. */
  txn?: boolean;
  /** With txn: false, the intent step already committed by the caller (beginCreateStep, in the
   * same transaction as its other records: one fsync'd commit fewer on the hot path). */
  intent?: Pick<StepRow, "id">;
  /** With intent: the caller records the success itself, in its next commit (closing the intent
   * `done`, the id `created` or beyond), so no commit of its own here. */
  deferDone?: boolean;
}

/** Steps 1-5 above. Call inside inPoolSection. Throws ThinIdTaken when the id exists already. */
export async function poolCreate(ctx: Ctx, workId: number, req: PoolOp, o: PoolCreateOptions = {}): Promise<void> {
  const { db } = ctx;
  const name = ctx.cfg.pool;
  const useTxn = o.txn !== false;
  if (useTxn && (o.intent || o.deferDone)) throw new ThinimgError("internal", "poolCreate: a caller-written intent has no transaction id record");
  if (o.deferDone && !o.intent) throw new ThinimgError("internal", "poolCreate: only a caller-written intent can be closed by the caller");
  const T = useTxn ? (await writablePool(ctx)).transactionId : null;
  const step = o.intent ?? beginCreateStep(db, name, workId, req, T);
  await pausePoint(`${req.op}:intent`, ctx.cfg.stateDir);
  try {
    if (req.op === "create_thin") await pool.createThin(name, req.thinId);
    // a caller-written intent was committed before this section: it names the create on disk
    else await pool.createSnap(name, req.thinId, req.originId, { intentOnDisk: o.intent !== undefined });
  } catch (e) {
    if (isDmError(e, "exists")) {
      tx(db, () => {
        recordOrphanThinId(db, name, req.thinId, `already existed in the pool when ${req.op} ran (not made by this attempt)`);
        endStep(db, step.id, "failed", "exists", (e as Error).message);
      });
      throw new ThinIdTaken(req.thinId);
    }
    if (createOutcomeUnknown(e)) {
      // timed out (or died in a way that says nothing): the kernel may still have done it. The step
      // stays pending; the next run settles it from the transaction id and the pool's metadata.
      log.warn(`pool ${name}: outcome of ${req.op} of thin id ${req.thinId} unknown (${(e as Error).message}); left for the next run to settle`);
      throw e;
    }
    endStep(db, step.id, "failed", "error", (e as Error).message);
    throw e;
  }
  await pausePoint(`${req.op}:sent`, ctx.cfg.stateDir);
  let outcome = "ok";
  if (T !== null) {
    try {
      await pool.setTransactionId(name, T, T + 1);
    } catch (e) {
      // the create itself succeeded (the message returned 0); only the crash record is missing
      outcome = `created; set_transaction_id ${T} ${T + 1} failed: ${(e as Error).message}`;
      log.warn(`pool ${name}: ${outcome}`);
    }
    // crash tests: the pool says the create ran, the DB does not yet
    await pausePoint(`${req.op}:txn`, ctx.cfg.stateDir);
  }
  if (o.deferDone) return;
  tx(db, () => {
    endStep(db, step.id, "done", outcome);
    setThinIdState(db, name, req.thinId, "created");
  });
}

/** A create message that failed without the kernel saying no: it may or may not have run. */
export function createOutcomeUnknown(e: unknown): boolean {
  if (!(e instanceof DmError)) return true;
  return e.dmKind === "timeout" || e.result.timedOut || e.result.exitCode === null;
}

const isCreate = (s: StepRow) => s.name === "create_thin" || s.name === "create_snap";
type PendingStep = ReturnType<typeof pendingSteps>[number];

/**
 * Settle intents left 'pending' by processes that died. Pool steps are decided by the pool's
 * transaction id; device/mount steps are recorded as interrupted (their owner's resume or GC looks
 * at the real device). Work rows of dead owners become 'interrupted'; pending activations 'failed'.
 */
export async function reconcilePending(ctx: Ctx): Promise<number> {
  const { db } = ctx;
  const name = ctx.cfg.pool;
  const dead = (w: { pid: number; start_time?: number | null; host: string }) =>
    !isSelf({ pid: w.pid, startTime: w.start_time ?? null, host: w.host }) && staleness({ pid: w.pid, startTime: w.start_time ?? null, host: w.host }).stale;
  // one query answers the usual case (every owner alive: this process, or another one working)
  if (!intentOwners(db, name).some(dead)) return 0;
  const steps = pendingSteps(db, name).filter((s) => dead({ pid: s.work_pid, start_time: s.work_start_time, host: s.work_host }));
  const deadWork = listWork(db, name, ["running"]).filter((w) => dead(w));
  if (steps.length === 0 && deadWork.length === 0) return 0;
  let txn: number | null = null;
  if (steps.some((s) => isCreate(s) && s.txn_before !== null)) txn = (await pool.poolStatusOk(name)).transactionId;
  // Unproven creates (transaction id not advanced): the pool's metadata says whether the id exists.
  // Read it from a metadata snapshot rather than by trying the create again, which would log a
  // device-mapper error in the kernel log (and trip the dmesg health check).
  let poolIds: Set<number> | null = null;
  if (steps.some((s) => isCreate(s) && s.txn_before !== null && txn === s.txn_before && s.work_kind !== "activate")) {
    poolIds = new Set(await readPoolThinIds(name, { stateDir: ctx.cfg.stateDir }));
  }
  for (const s of steps) {
    if (isCreate(s) && s.thin_id !== null) {
      tx(db, () => settleCreate(db, name, s, txn, poolIds));
      log.warn(`pool ${name}: interrupted ${s.name} of thin id ${s.thin_id} (pid ${s.work_pid} died) settled`);
    } else {
      endStep(db, s.id, "failed", `interrupted: pid ${s.work_pid} died during ${s.name}`);
    }
  }
  for (const w of deadWork) tx(db, () => settleDeadWork(db, name, w));
  return steps.length + deadWork.length;
}

/** A dead process's pending create, decided by the pool's transaction id `txn` and, when that did
 * not move, by the thin ids in the pool's metadata (`poolIds`). Call inside a transaction. */
function settleCreate(db: Db, name: string, s: PendingStep, txn: number | null, poolIds: Set<number> | null): void {
  const isSnapshot = s.work_kind === "activate";
  const thinId = s.thin_id!;
  const t = getThinId(db, name, thinId);
  if (txn !== null && s.txn_after !== null && txn === s.txn_after) {
    endStep(db, s.id, "done", `reconciled: pool transaction id is ${txn}, the ${s.name} ran`);
    if (t && t.state === "allocated") {
      if (isSnapshot) setThinIdState(db, name, thinId, "orphaned", "activation interrupted after its snapshot was created");
      else setThinIdState(db, name, thinId, "created");
    }
    return;
  }
  const why =
    s.txn_before === null
      ? `reconciled: activation interrupted around its ${s.name} (no transaction id record); unconfirmed`
      : txn === s.txn_before
        ? `reconciled: pool transaction id still ${txn}; the ${s.name} may or may not have run`
        : `reconciled: pool transaction id moved to ${txn} (expected ${s.txn_before} or ${s.txn_after}); unconfirmed`;
  endStep(db, s.id, "failed", why);
  // Not in the pool → the create never ran: the id stays 'allocated' and its layer owner creates it
  // on resume. In the pool but unproven → recorded orphaned, never adopted (GC deletes it). A dead
  // activation has no owner to resume: orphaned either way.
  const absent = poolIds !== null && !poolIds.has(thinId);
  if (t && t.state === "allocated" && !absent)
    setThinIdState(db, name, thinId, "orphaned", `${why}; ${poolIds?.has(thinId) ? "it is in the pool" : "it may be in the pool"}`);
}

/** A dead process's running work: interrupted; a dead activation's snapshot failed, its thin id
 * orphaned and its device leaked (GC settles both). Call inside a transaction. */
function settleDeadWork(db: Db, name: string, w: WorkRow): void {
  finishWork(db, w.id, "interrupted", { error: `pid ${w.pid} (${w.command}) died while running`, kind: "interrupted" });
  if (w.kind !== "activate") return;
  const snapId = parseWorkSubject(w.subject)?.id ?? Number.NaN;
  for (const snap of listSnapshots(db, name, ["pending"]).filter((x) => x.id === snapId)) {
    updateSnapshot(db, snap.id, { state: "failed", error: `activation interrupted: pid ${w.pid} died` });
    if (snap.thin_id !== null) {
      const t = getThinId(db, name, snap.thin_id);
      if (t && (t.state === "allocated" || t.state === "created")) setThinIdState(db, name, snap.thin_id, "orphaned", "activation interrupted");
    }
    if (snap.device_name) {
      const d = listDevices(db, name).find((x) => x.name === snap.device_name && (x.state === "activating" || x.state === "active"));
      if (d) setDeviceState(db, name, d.name, "leaked", "activation interrupted");
    }
  }
}

/** Thin ids in the pool's metadata, read from a metadata snapshot under the state dir's
 * metadata-snapshot lock (lib/dm/metadata-snap.ts). Call inside a pool section: the process lock rules
 * out another pool section and `gc --force`, so a hold that outlives its quiet period belonged to a
 * reader that died holding it (killed between reserve and release) — released, or every later reserve
 * would fail with EBUSY. */
export async function readPoolThinIds(poolName: string, o: { stateDir: string } & HoldOptions): Promise<number[]> {
  const entries = await withMetadataSnapshot(poolName, { ...o, releaseStale: true, maxWaitMs: o.maxWaitMs ?? 120_000 }, (meta) =>
    thinLs(meta, { metadataSnap: true }),
  );
  return entries.map((e) => e.id).sort((a, b) => a - b);
}
