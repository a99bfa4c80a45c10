// Units of work and their steps (intents). A step row is written BEFORE the action it names and
// finished after; a 'pending' step found later means its process died in between, and the pool's
// transaction id (txn_before/txn_after) or the device's presence tells which side of it we are on.
import { type Db, now } from "./db.ts";

export type WorkKind = "unpack" | "build_layer" | "activate" | "release";
export type WorkState = "running" | "done" | "failed" | "interrupted";
export type StepState = "pending" | "done" | "failed";

export interface Owner {
  pid: number;
  startTime: number | null;
  host: string;
  command: string;
}

export interface WorkRow {
  id: number;
  pool: string;
  kind: WorkKind;
  subject: string;
  state: WorkState;
  pid: number;
  start_time: number | null;
  host: string;
  command: string;
  error: string | null;
  error_kind: string | null;
  leaks: string | null;
  created_at: number;
  updated_at: number;
  finished_at: number | null;
}

export interface StepRow {
  id: number;
  work_id: number;
  pool: string;
  name: string;
  state: StepState;
  thin_id: number | null;
  origin_thin_id: number | null;
  device_name: string | null;
  txn_before: number | null;
  txn_after: number | null;
  outcome: string | null;
  error: string | null;
  created_at: number;
  updated_at: number;
}

/** A resource a failed or interrupted unit of work left behind on purpose (fail dumb). */
export interface Leak {
  kind: "mount" | "device" | "thin_id";
  /** Mount path, device name, or thin id. */
  ref: string | number;
  reason: string;
}

export function startWork(db: Db, pool: string, kind: WorkKind, subject: string, o: Owner): WorkRow {
  const t = now();
  return db
    .query(
      "INSERT INTO work (pool, kind, subject, state, pid, start_time, host, command, created_at, updated_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?) RETURNING *",
    )
    .get(pool, kind, subject, o.pid, o.startTime, o.host, o.command, t, t) as WorkRow;
}

export function finishWork(db: Db, id: number, state: Exclude<WorkState, "running">, e: { error?: string; kind?: string; leaks?: Leak[] } = {}): void {
  const t = now();
  db.query("UPDATE work SET state = ?, error = ?, error_kind = ?, leaks = ?, finished_at = ?, updated_at = ? WHERE id = ?").run(
    state,
    e.error ?? null,
    e.kind ?? null,
    e.leaks?.length ? JSON.stringify(e.leaks) : null,
    t,
    t,
    id,
  );
}

export function listWork(db: Db, pool: string, states?: WorkState[]): WorkRow[] {
  if (!states) return db.query("SELECT * FROM work WHERE pool = ? ORDER BY id").all(pool) as WorkRow[];
  const ph = states.map(() => "?").join(",");
  return db.query(`SELECT * FROM work WHERE pool = ? AND state IN (${ph}) ORDER BY id`).all(pool, ...states) as WorkRow[];
}

export function beginStep(
  db: Db,
  workId: number,
  pool: string,
  name: string,
  s: { thinId?: number | null; originThinId?: number | null; deviceName?: string | null; txnBefore?: number | null; txnAfter?: number | null } = {},
): StepRow {
  const t = now();
  return db
    .query(
      `INSERT INTO steps (work_id, pool, name, state, thin_id, origin_thin_id, device_name, txn_before, txn_after, created_at, updated_at)
       VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?) RETURNING *`,
    )
    .get(workId, pool, name, s.thinId ?? null, s.originThinId ?? null, s.deviceName ?? null, s.txnBefore ?? null, s.txnAfter ?? null, t, t) as StepRow;
}

export function endStep(db: Db, id: number, state: Exclude<StepState, "pending">, outcome: string, error: string | null = null): void {
  db.query("UPDATE steps SET state = ?, outcome = ?, error = ?, updated_at = ? WHERE id = ?").run(state, outcome, error, now(), id);
}

export function pendingSteps(
  db: Db,
  pool: string,
): (StepRow & { work_pid: number; work_start_time: number | null; work_host: string; work_kind: WorkKind; work_subject: string })[] {
  return db
    .query(
      `SELECT s.*, w.pid AS work_pid, w.start_time AS work_start_time, w.host AS work_host, w.kind AS work_kind, w.subject AS work_subject
       FROM steps s JOIN work w ON w.id = s.work_id WHERE s.pool = ? AND s.state = 'pending' ORDER BY s.id`,
    )
    .all(pool) as (StepRow & { work_pid: number; work_start_time: number | null; work_host: string; work_kind: WorkKind; work_subject: string })[];
}

/** Who could have left intents in this pool: the owners of its running work and of its pending
 * steps (a step can stay pending after its work ended: an unknown create outcome). Distinct. */
export function intentOwners(db: Db, pool: string): { pid: number; start_time: number | null; host: string }[] {
  return db
    .query(
      `SELECT pid, start_time, host FROM work WHERE pool = ? AND state = 'running'
       UNION SELECT w.pid, w.start_time, w.host FROM steps s JOIN work w ON w.id = s.work_id WHERE s.pool = ? AND s.state = 'pending'`,
    )
    .all(pool, pool) as { pid: number; start_time: number | null; host: string }[];
}

/** Whether a `name` step on this thin id has ever completed (e.g. the flush of a layer attempt). */
export function stepDone(db: Db, pool: string, name: string, thinId: number): boolean {
  return db.query("SELECT 1 FROM steps WHERE pool = ? AND name = ? AND thin_id = ? AND state = 'done' LIMIT 1").get(pool, name, thinId) !== null;
}

export function stepsOf(db: Db, workId: number): StepRow[] {
  return db.query("SELECT * FROM steps WHERE work_id = ? ORDER BY id").all(workId) as StepRow[];
}
