// The service's job rows (table `jobs`, migration 4). A job is one requested unpack; at most one
// live (queued/running/interrupted) job per image and pool, enforced by a partial unique index, so a
// repeated request returns the job already there instead of queueing a second build.
import type { ErrorKind } from "../errors.ts";
import { type Db, now, tx } from "../store/db.ts";

export type JobState = "queued" | "running" | "succeeded" | "failed" | "interrupted";
export const JOB_STATES: readonly JobState[] = ["queued", "running", "succeeded", "failed", "interrupted"];
const LIVE: readonly JobState[] = ["queued", "running", "interrupted"];

export interface UnpackParams {
  platform?: string | undefined;
  refresh?: boolean | undefined;
}

export interface JobRow {
  id: number;
  pool: string;
  kind: "unpack";
  state: JobState;
  image: string;
  source: string;
  params: string;
  attempts: number;
  result: string | null;
  error_kind: string | null;
  error_message: string | null;
  error_hint: string | null;
  created_at: number;
  updated_at: number;
  started_at: number | null;
  finished_at: number | null;
}

export interface JobError {
  kind: ErrorKind | string;
  message: string;
  hint: string | null;
}

export type EnqueueResult = { created: true; job: JobRow } | { created: false; job: JobRow };

const liveJob = (db: Db, pool: string, image: string): JobRow | null =>
  db.query(`SELECT * FROM jobs WHERE pool = ? AND image = ? AND state IN (${LIVE.map(() => "?").join(",")})`).get(pool, image, ...LIVE) as JobRow | null;

/** Queue an unpack of `image`, or return the live job already there for it. */
export function enqueueUnpack(db: Db, j: { pool: string; image: string; source: string; params: UnpackParams }): EnqueueResult {
  return tx(db, (): EnqueueResult => {
    const existing = liveJob(db, j.pool, j.image);
    if (existing) return { created: false, job: existing };
    const t = now();
    const job = db
      .query("INSERT INTO jobs (pool, kind, state, image, source, params, created_at, updated_at) VALUES (?, 'unpack', 'queued', ?, ?, ?, ?, ?) RETURNING *")
      .get(j.pool, j.image, j.source, JSON.stringify(j.params), t, t) as JobRow;
    return { created: true, job };
  });
}

export function getJob(db: Db, id: number): JobRow | null {
  return db.query("SELECT * FROM jobs WHERE id = ?").get(id) as JobRow | null;
}

export function listJobs(db: Db, pool: string, o: { state?: JobState | undefined; limit?: number } = {}): JobRow[] {
  const limit = o.limit ?? 1000;
  return (
    o.state
      ? db.query("SELECT * FROM jobs WHERE pool = ? AND state = ? ORDER BY id DESC LIMIT ?").all(pool, o.state, limit)
      : db.query("SELECT * FROM jobs WHERE pool = ? ORDER BY id DESC LIMIT ?").all(pool, limit)
  ) as JobRow[];
}

export function countJobsByState(db: Db, pool: string): Record<JobState, number> {
  const out = Object.fromEntries(JOB_STATES.map((s) => [s, 0])) as Record<JobState, number>;
  for (const r of db.query("SELECT state, COUNT(*) AS n FROM jobs WHERE pool = ? GROUP BY state").all(pool) as { state: JobState; n: number }[])
    out[r.state] = r.n;
  return out;
}

/** The oldest queued job, claimed (state running, attempt counted) in one transaction; null when
 * the queue is empty. The state guard makes a claim exclusive even across processes. */
export function claimNextJob(db: Db, pool: string): JobRow | null {
  return tx(db, () => {
    const next = db.query("SELECT id FROM jobs WHERE pool = ? AND state = 'queued' ORDER BY id LIMIT 1").get(pool) as { id: number } | null;
    if (!next) return null;
    const t = now();
    return db
      .query("UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, updated_at = ? WHERE id = ? AND state = 'queued' RETURNING *")
      .get(t, t, next.id) as JobRow | null;
  });
}

export function finishJob(db: Db, id: number, r: { ok: true; result: unknown } | { ok: false; error: JobError }): void {
  const t = now();
  if (r.ok) {
    db.query("UPDATE jobs SET state = 'succeeded', result = ?, finished_at = ?, updated_at = ? WHERE id = ? AND state = 'running'").run(
      JSON.stringify(r.result),
      t,
      t,
      id,
    );
  } else {
    db.query(
      "UPDATE jobs SET state = 'failed', error_kind = ?, error_message = ?, error_hint = ?, finished_at = ?, updated_at = ? WHERE id = ? AND state = 'running'",
    ).run(r.error.kind, r.error.message, r.error.hint, t, t, id);
  }
}

/** The service is stopping (or died) while the job ran: record it, to be queued again on start. */
export function interruptJob(db: Db, id: number): void {
  db.query("UPDATE jobs SET state = 'interrupted', updated_at = ? WHERE id = ? AND state = 'running'").run(now(), id);
}

/** On start (under the service lock, so no other runner exists): jobs left running by a service
 * that died are interrupted; every interrupted job is queued again. Returns how many were requeued. */
export function requeueInterrupted(db: Db, pool: string): number {
  return tx(db, () => {
    const t = now();
    db.query("UPDATE jobs SET state = 'interrupted', updated_at = ? WHERE pool = ? AND state = 'running'").run(t, pool);
    return db.query("UPDATE jobs SET state = 'queued', updated_at = ? WHERE pool = ? AND state = 'interrupted'").run(t, pool).changes;
  });
}

/** Delete finished jobs older than the retention period; returns how many. */
export function pruneJobs(db: Db, pool: string, olderThanMs: number, at = now()): number {
  return db.query("DELETE FROM jobs WHERE pool = ? AND state IN ('succeeded','failed') AND finished_at < ?").run(pool, at - olderThanMs).changes;
}
