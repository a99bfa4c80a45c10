// Every dm device thinimg activates, with its state, so GC can tell ours-and-live from leaked.
import { type Db, now, poolRowsInStates } from "./db.ts";

export type DeviceState = "activating" | "active" | "removing" | "removed" | "leaked";
export type DeviceKind = "layer" | "snap";

export interface DeviceRow {
  pool: string;
  name: string;
  thin_id: number;
  kind: DeviceKind;
  state: DeviceState;
  reason: string | null;
  created_at: number;
  updated_at: number;
}

/** Insert or move a device row to `state` (a name is reactivated with the same thin id). */
export function setDevice(db: Db, d: { pool: string; name: string; thinId: number; kind: DeviceKind; state: DeviceState; reason?: string | null }): void {
  const t = now();
  db.query(
    `INSERT INTO devices (pool, name, thin_id, kind, state, reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT (pool, name) DO UPDATE SET thin_id = excluded.thin_id, kind = excluded.kind, state = excluded.state,
       reason = excluded.reason, updated_at = excluded.updated_at`,
  ).run(d.pool, d.name, d.thinId, d.kind, d.state, d.reason ?? null, t, t);
}

export function setDeviceState(db: Db, pool: string, name: string, state: DeviceState, reason: string | null = null): void {
  db.query("UPDATE devices SET state = ?, reason = ?, updated_at = ? WHERE pool = ? AND name = ?").run(state, reason, now(), pool, name);
}

export function getDevice(db: Db, pool: string, name: string): DeviceRow | null {
  return db.query("SELECT * FROM devices WHERE pool = ? AND name = ?").get(pool, name) as DeviceRow | null;
}

export function listDevices(db: Db, pool: string, states?: DeviceState[]): DeviceRow[] {
  return poolRowsInStates<DeviceRow>(db, "devices", pool, "name", states);
}
