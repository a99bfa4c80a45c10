// The state database: one SQLite file in the state dir. WAL so readers (list, GC dry-run) never block
// the writer; synchronous=FULL because a row here is the only record of a pool change after a power
// loss; a busy timeout so concurrent thinimg processes queue instead of failing.
import { Database } from "bun:sqlite";
import { mkdirSync, statSync } from "node:fs";
import { basename, dirname } from "node:path";
import { errorMessage, ThinimgError } from "../errors.ts";
import { MIGRATIONS, migrate } from "./migrations.ts";

export type Db = Database;

export const BUSY_TIMEOUT_MS = 10_000;

export interface OpenOptions {
  /** Open an existing DB read-only (list, dry-runs); no migration. */
  readOnly?: boolean;
  /** Only open a DB that is there: commands that act on what an unpack made (activate, release,
   * remove, prune) never create a state dir, so a mistyped --state-dir is an error, not a fresh
   * empty state dir at that path. */
  existing?: boolean;
}

/** No state database at `path` (ENOENT only: a state dir this user cannot read is not "missing",
 * its open fails with the permissions hint instead). */
export function noStateDb(path: string): boolean {
  try {
    return statSync(path, { throwIfNoEntry: false }) === undefined;
  } catch {
    return false;
  }
}

/** The error of a state dir that has no state database. */
export function noStateError(path: string): ThinimgError {
  return new ThinimgError("missing", `no thinimg state in ${dirname(path)} (no ${basename(path)} there)`, {
    hint: "pass the state dir the images were unpacked with (--state-dir or THINIMG_STATE_DIR); `bun scripts/unpack.ts` creates one",
  });
}

export function openDb(path: string, o: OpenOptions = {}): Db {
  let db: Database;
  if (o.existing && noStateDb(path)) throw noStateError(path);
  try {
    if (!o.readOnly) mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    db = o.readOnly ? new Database(path, { readonly: true, strict: true }) : new Database(path, { create: true, strict: true });
  } catch (e) {
    throw new ThinimgError("input", `cannot open state database ${path}: ${errorMessage(e)}`, {
      hint: o.readOnly ? "run an unpack first, or pass the right --state-dir" : "check --state-dir / THINIMG_STATE_DIR and its permissions",
    });
  }
  db.exec(`PRAGMA busy_timeout = ${BUSY_TIMEOUT_MS}`);
  if (!o.readOnly) {
    db.exec("PRAGMA journal_mode = WAL");
    db.exec("PRAGMA synchronous = FULL");
  }
  db.exec("PRAGMA foreign_keys = ON");
  const version = o.readOnly ? (db.query("PRAGMA user_version").get() as { user_version: number }).user_version : migrate(db);
  if (version > MIGRATIONS.length) {
    db.close();
    throw new ThinimgError("conflict", `state database ${path} has schema version ${version}, this thinimg knows ${MIGRATIONS.length}`, {
      hint: "upgrade thinimg; never run an older thinimg against a newer state dir",
    });
  }
  return db;
}

/** Run fn in an IMMEDIATE transaction (takes the write lock up front: no upgrade deadlocks). */
export function tx<T>(db: Db, fn: () => T): T {
  return db.transaction(fn).immediate();
}

export const now = (): number => Date.now();

/** A pool's rows of `table`, all or only those in `states`, in `orderBy` order. */
export function poolRowsInStates<T>(db: Db, table: string, pool: string, orderBy: string, states?: readonly string[]): T[] {
  if (!states) return db.query(`SELECT * FROM ${table} WHERE pool = ? ORDER BY ${orderBy}`).all(pool) as T[];
  const ph = states.map(() => "?").join(",");
  return db.query(`SELECT * FROM ${table} WHERE pool = ? AND state IN (${ph}) ORDER BY ${orderBy}`).all(pool, ...states) as T[];
}
