// The thin id ledger. Ids are handed out by the DB (max + 1 per pool), so two processes never pick the
// same one, and an id is never reused before GC has confirmed its delete.
import { ThinimgError } from "../errors.ts";
import { type Db, now, poolRowsInStates, tx } from "./db.ts";

export type ThinIdState = "allocated" | "created" | "committed" | "deleting" | "deleted" | "orphaned";
export type OwnerKind = "layer" | "snapshot" | "none";

export interface ThinIdRow {
  pool: string;
  thin_id: number;
  owner_kind: OwnerKind;
  owner_id: number | null;
  origin_thin_id: number | null;
  state: ThinIdState;
  reason: string | null;
  created_at: number;
  updated_at: number;
}

export const MAX_THIN_ID = 2 ** 24 - 1;
/** Id 0 is left alone: other tools conventionally use it for a first test device. */
export const FIRST_THIN_ID = 1;

/** Reserve the next free id for an owner. Reuses only ids GC has confirmed deleted, and only once
 * the 24-bit space is exhausted. */
export function allocateThinId(
  db: Db,
  pool: string,
  owner: { kind: OwnerKind; id: number | null },
  originThinId: number | null = null,
  reason: string | null = null,
): number {
  // inside the caller's transaction as it is (no savepoint): the id and its claim commit together
  const allocate = (): number => {
    const max = (db.query("SELECT MAX(thin_id) AS m FROM thin_ids WHERE pool = ?").get(pool) as { m: number | null }).m;
    let id = max === null ? FIRST_THIN_ID : max + 1;
    const t = now();
    if (id > MAX_THIN_ID) {
      const free = db.query("SELECT thin_id FROM thin_ids WHERE pool = ? AND state = 'deleted' ORDER BY thin_id LIMIT 1").get(pool) as {
        thin_id: number;
      } | null;
      if (!free) {
        throw new ThinimgError("policy", `pool ${pool}: all ${MAX_THIN_ID} thin ids are in use or awaiting GC`, { hint: "run `bun scripts/gc.ts --force`" });
      }
      id = free.thin_id;
      db.query(
        "UPDATE thin_ids SET owner_kind = ?, owner_id = ?, origin_thin_id = ?, state = 'allocated', reason = ?, created_at = ?, updated_at = ? WHERE pool = ? AND thin_id = ?",
      ).run(owner.kind, owner.id, originThinId, reason, t, t, pool, id);
      return id;
    }
    db.query(
      "INSERT INTO thin_ids (pool, thin_id, owner_kind, owner_id, origin_thin_id, state, reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'allocated', ?, ?, ?)",
    ).run(pool, id, owner.kind, owner.id, originThinId, reason, t, t);
    return id;
  };
  return db.inTransaction ? allocate() : tx(db, allocate);
}

export function setThinIdState(db: Db, pool: string, thinId: number, state: ThinIdState, reason: string | null = null): void {
  const r = db
    .query("UPDATE thin_ids SET state = ?, reason = COALESCE(?, reason), updated_at = ? WHERE pool = ? AND thin_id = ?")
    .run(state, reason, now(), pool, thinId);
  if (r.changes !== 1) throw new ThinimgError("internal", `thin id ${thinId} of pool ${pool} is not in the ledger`);
}

/** Record an id that exists in the pool but was not made by us (or cannot be proven to be ours). */
export function recordOrphanThinId(db: Db, pool: string, thinId: number, reason: string): void {
  const t = now();
  db.query(
    `INSERT INTO thin_ids (pool, thin_id, owner_kind, owner_id, state, reason, created_at, updated_at)
     VALUES (?, ?, 'none', NULL, 'orphaned', ?, ?, ?)
     ON CONFLICT (pool, thin_id) DO UPDATE SET state = 'orphaned', reason = excluded.reason, updated_at = excluded.updated_at`,
  ).run(pool, thinId, reason, t, t);
}

export function getThinId(db: Db, pool: string, thinId: number): ThinIdRow | null {
  return db.query("SELECT * FROM thin_ids WHERE pool = ? AND thin_id = ?").get(pool, thinId) as ThinIdRow | null;
}

export function listThinIds(db: Db, pool: string, states?: ThinIdState[]): ThinIdRow[] {
  return poolRowsInStates<ThinIdRow>(db, "thin_ids", pool, "thin_id", states);
}
