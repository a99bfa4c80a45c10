// Every mount thinimg makes, so a crash or failure leaves a record GC can act on.
import { type Db, now } from "./db.ts";

export type MountState = "mounting" | "mounted" | "unmounting" | "unmounted" | "leaked";

export interface MountRow {
  path: string;
  pool: string;
  device_name: string;
  thin_id: number;
  purpose: "apply" | "inspect";
  state: MountState;
  reason: string | null;
  created_at: number;
  updated_at: number;
}

export function setMount(
  db: Db,
  m: { path: string; pool: string; deviceName: string; thinId: number; purpose: "apply" | "inspect"; state: MountState; reason?: string | null },
): void {
  const t = now();
  db.query(
    `INSERT INTO mounts (path, pool, device_name, thin_id, purpose, state, reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT (path) DO UPDATE SET pool = excluded.pool, device_name = excluded.device_name, thin_id = excluded.thin_id,
       purpose = excluded.purpose, state = excluded.state, reason = excluded.reason, updated_at = excluded.updated_at`,
  ).run(m.path, m.pool, m.deviceName, m.thinId, m.purpose, m.state, m.reason ?? null, t, t);
}

export function setMountState(db: Db, path: string, state: MountState, reason: string | null = null): void {
  db.query("UPDATE mounts SET state = ?, reason = ?, updated_at = ? WHERE path = ?").run(state, reason, now(), path);
}

export function getMount(db: Db, path: string): MountRow | null {
  return db.query("SELECT * FROM mounts WHERE path = ?").get(path) as MountRow | null;
}

export function listMounts(db: Db, pool: string, states?: MountState[]): MountRow[] {
  if (!states) return db.query("SELECT * FROM mounts WHERE pool = ? ORDER BY path").all(pool) as MountRow[];
  const ph = states.map(() => "?").join(",");
  return db.query(`SELECT * FROM mounts WHERE pool = ? AND state IN (${ph}) ORDER BY path`).all(pool, ...states) as MountRow[];
}
