// Rows of the named-lock table (the locking logic with staleness rules lives in lib/lock).
import type { Db } from "./db.ts";

export interface LockRow {
  key: string;
  pid: number;
  start_time: number | null;
  host: string;
  command: string;
  acquired_at: number;
}

export function getLockRow(db: Db, key: string): LockRow | null {
  return db.query("SELECT * FROM locks WHERE key = ?").get(key) as LockRow | null;
}

export function putLockRow(db: Db, r: LockRow): void {
  db.query(
    `INSERT INTO locks (key, pid, start_time, host, command, acquired_at) VALUES (?, ?, ?, ?, ?, ?)
     ON CONFLICT (key) DO UPDATE SET pid = excluded.pid, start_time = excluded.start_time, host = excluded.host,
       command = excluded.command, acquired_at = excluded.acquired_at`,
  ).run(r.key, r.pid, r.start_time, r.host, r.command, r.acquired_at);
}

export function deleteLockRow(db: Db, key: string, pid: number, startTime: number | null): boolean {
  return db.query("DELETE FROM locks WHERE key = ? AND pid = ? AND start_time IS ?").run(key, pid, startTime).changes === 1;
}
