// Versioned schema. PRAGMA user_version holds the number of migrations applied; each migration runs
// in its own IMMEDIATE transaction together with the version bump, so a crash mid-migration leaves
// the previous version intact. Never edit a shipped migration: append a new one.
//
// Conventions: every *_at column is unix milliseconds (INTEGER); every table is STRICT; `pool` scopes
// rows that belong to one thin-pool (thin ids are per pool). GC reads these tables to find
// every thin id ever allocated (thin_ids), every dm device ever activated (devices), every mount
// (mounts) and every unit of work with its owner process (work/steps).
import type { Database } from "bun:sqlite";

export const MIGRATIONS: readonly string[] = [
  // 1: initial schema
  `
  -- Content-addressed blob cache entries (<stateDir>/blobs/sha256/<hex>).
  CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY CHECK (digest GLOB 'sha256:*'),
    size        INTEGER NOT NULL CHECK (size >= 0),
    compression TEXT CHECK (compression IN ('none','gzip','zstd')),
    diff_id     TEXT,
    state       TEXT NOT NULL CHECK (state IN ('fetching','present','failed','deleted')),
    error       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
  ) STRICT;

  -- The thin id ledger: every id ever handed out in a pool, never deleted, never reused until GC
  -- has confirmed the delete (state 'deleted').
  --   allocated  reserved here; the pool change is not confirmed yet
  --   created    the pool has it (confirmed by its transaction id); work on it in progress or failed
  --   committed  live: a committed layer or an active snapshot owns it
  --   deleting   GC sent (or is about to send) the delete
  --   deleted    GC confirmed it is gone from the pool
  --   orphaned   in the pool (or possibly in it) but owned by nothing live: released snapshot,
  --              abandoned build attempt, id that already existed when we tried to create it
  CREATE TABLE thin_ids (
    pool           TEXT NOT NULL,
    thin_id        INTEGER NOT NULL CHECK (thin_id BETWEEN 0 AND 16777215),
    owner_kind     TEXT NOT NULL CHECK (owner_kind IN ('layer','snapshot','none')),
    owner_id       INTEGER,
    origin_thin_id INTEGER,
    state          TEXT NOT NULL CHECK (state IN ('allocated','created','committed','deleting','deleted','orphaned')),
    reason         TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (pool, thin_id)
  ) STRICT;
  CREATE INDEX thin_ids_state ON thin_ids (pool, state);

  -- Every dm device thinimg activated (name is deterministic from kind + thin id).
  --   activating → active → removing → removed; 'leaked' = left behind by a failure (GC removes it)
  CREATE TABLE devices (
    pool       TEXT NOT NULL,
    name       TEXT NOT NULL,
    thin_id    INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('layer','snap')),
    state      TEXT NOT NULL CHECK (state IN ('activating','active','removing','removed','leaked')),
    reason     TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (pool, name),
    FOREIGN KEY (pool, thin_id) REFERENCES thin_ids (pool, thin_id)
  ) STRICT;
  CREATE INDEX devices_state ON devices (pool, state);

  -- Every mount thinimg made (layer application happens in <stateDir>/mnt/<device name>).
  CREATE TABLE mounts (
    path        TEXT PRIMARY KEY,
    pool        TEXT NOT NULL,
    device_name TEXT NOT NULL,
    thin_id     INTEGER NOT NULL,
    purpose     TEXT NOT NULL CHECK (purpose IN ('apply','inspect')),
    state       TEXT NOT NULL CHECK (state IN ('mounting','mounted','unmounting','unmounted','leaked')),
    reason      TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    FOREIGN KEY (pool, thin_id) REFERENCES thin_ids (pool, thin_id)
  ) STRICT;

  -- One row per layer chain per pool: the device holding the filesystem up to and including it.
  -- chain_id = sha256(parent chain_id + " " + identity), identity = diff_id ?? blob digest.
  -- phase = last completed build step (resume point); attempt counts fresh thin ids tried.
  CREATE TABLE layers (
    id              INTEGER PRIMARY KEY,
    pool            TEXT NOT NULL,
    chain_id        TEXT NOT NULL,
    parent_id       INTEGER REFERENCES layers (id),
    parent_chain_id TEXT,
    identity        TEXT NOT NULL,
    diff_id         TEXT,
    digest          TEXT NOT NULL,
    size            INTEGER NOT NULL,
    thin_id         INTEGER,
    device_name     TEXT,
    virtual_size    INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('building','committed','failed')),
    phase           TEXT NOT NULL,
    attempt         INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    error_kind      TEXT,
    stats           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    committed_at    INTEGER,
    UNIQUE (pool, chain_id),
    FOREIGN KEY (pool, thin_id) REFERENCES thin_ids (pool, thin_id)
  ) STRICT;

  CREATE TABLE images (
    id           INTEGER PRIMARY KEY,
    pool         TEXT NOT NULL,
    name         TEXT NOT NULL,
    source       TEXT NOT NULL,
    format       TEXT,
    top_chain_id TEXT,
    top_layer_id INTEGER REFERENCES layers (id),
    config       TEXT,
    state        TEXT NOT NULL CHECK (state IN ('unpacking','ready','failed')),
    error        TEXT,
    error_kind   TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    ready_at     INTEGER,
    UNIQUE (pool, name)
  ) STRICT;

  CREATE TABLE image_layers (
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    position INTEGER NOT NULL CHECK (position >= 0),
    layer_id INTEGER NOT NULL REFERENCES layers (id),
    PRIMARY KEY (image_id, position)
  ) STRICT;

  -- Activations: a fresh thin snapshot of an image's top layer per request.
  CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY,
    pool         TEXT NOT NULL,
    image_id     INTEGER NOT NULL REFERENCES images (id),
    layer_id     INTEGER NOT NULL REFERENCES layers (id),
    thin_id      INTEGER,
    device_name  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('pending','active','released','failed')),
    error        TEXT,
    pid          INTEGER,
    command      TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    activated_at INTEGER,
    released_at  INTEGER,
    FOREIGN KEY (pool, thin_id) REFERENCES thin_ids (pool, thin_id)
  ) STRICT;
  CREATE INDEX snapshots_state ON snapshots (pool, state);

  -- Named locks (per image, per layer chain). Stale when the holder's PID is dead or its start time
  -- (/proc/PID/stat field 22) differs — the PID was reused.
  CREATE TABLE locks (
    key         TEXT PRIMARY KEY,
    pid         INTEGER NOT NULL,
    start_time  INTEGER,
    host        TEXT NOT NULL,
    command     TEXT NOT NULL,
    acquired_at INTEGER NOT NULL
  ) STRICT;

  -- Units of work (unpack an image, build a layer, activate, release) with their owner process, so a
  -- later run (or GC) can tell in-flight work from interrupted work.
  CREATE TABLE work (
    id          INTEGER PRIMARY KEY,
    pool        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('unpack','build_layer','activate','release')),
    subject     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('running','done','failed','interrupted')),
    pid         INTEGER NOT NULL,
    start_time  INTEGER,
    host        TEXT NOT NULL,
    command     TEXT NOT NULL,
    error       TEXT,
    error_kind  TEXT,
    leaks       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    finished_at INTEGER
  ) STRICT;
  CREATE INDEX work_state ON work (pool, state);

  -- Intents: written BEFORE each step that changes the pool or a device; txn_before/txn_after are
  -- the pool transaction ids around a pool message, so after a crash the pool says whether it ran.
  CREATE TABLE steps (
    id             INTEGER PRIMARY KEY,
    work_id        INTEGER NOT NULL REFERENCES work (id),
    pool           TEXT NOT NULL,
    name           TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending','done','failed')),
    thin_id        INTEGER,
    origin_thin_id INTEGER,
    device_name    TEXT,
    txn_before     INTEGER,
    txn_after      INTEGER,
    outcome        TEXT,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
  ) STRICT;
  CREATE INDEX steps_pending ON steps (pool, state);
  `,
  // 2: layers.phase is a state column and is checked like the others. SQLite cannot add a CHECK to
  // an existing column without rebuilding the table, so two triggers enforce the same rule.
  `
  CREATE TRIGGER layers_phase_insert BEFORE INSERT ON layers
    WHEN NEW.phase NOT IN ('new','allocated','created','activated','formatted','mounted','applied','unmounted','deactivated','committed')
  BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: layers.phase'); END;
  CREATE TRIGGER layers_phase_update BEFORE UPDATE OF phase ON layers
    WHEN NEW.phase NOT IN ('new','allocated','created','activated','formatted','mounted','applied','unmounted','deactivated','committed')
  BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: layers.phase'); END;
  `,
  // 3: GC's first sightings of thin ids the DB never knew: such an id is deleted only once it has
  // been seen for the grace period (a DB restored from a backup must not cost live devices at once).
  // IF NOT EXISTS: GC created this table itself before it was a migration.
  `
  CREATE TABLE IF NOT EXISTS gc_unknown_ids (
    pool          TEXT NOT NULL,
    thin_id       INTEGER NOT NULL CHECK (thin_id BETWEEN 0 AND 16777215),
    first_seen_at INTEGER NOT NULL,
    PRIMARY KEY (pool, thin_id)
  ) STRICT;
  `,
  // 4: a snapshot's own size (re-attaching after a reboot loads it with the same length), and the
  // rescue of snapshots an older GC marked failed only because their device was gone (a reboot):
  // their data is handed back unless the thin id was already deleted.
  `
  ALTER TABLE snapshots ADD COLUMN virtual_size INTEGER CHECK (virtual_size IS NULL OR virtual_size > 0);
  UPDATE thin_ids SET state = 'committed', reason = 'restored: its snapshot was never released', updated_at = CAST(strftime('%s','now') AS INTEGER) * 1000
    WHERE state = 'orphaned' AND reason = 'gc: its device was removed outside thinimg'
      AND EXISTS (SELECT 1 FROM snapshots s WHERE s.pool = thin_ids.pool AND s.thin_id = thin_ids.thin_id
                  AND s.state = 'failed' AND s.error LIKE '%no longer exists (removed outside thinimg); marked failed%');
  UPDATE snapshots SET state = 'active', error = NULL, updated_at = CAST(strftime('%s','now') AS INTEGER) * 1000
    WHERE state = 'failed' AND error LIKE '%no longer exists (removed outside thinimg); marked failed%'
      AND EXISTS (SELECT 1 FROM thin_ids t WHERE t.pool = snapshots.pool AND t.thin_id = snapshots.thin_id AND t.state = 'committed');
  `,
  // 5: the service's durable job queue (bun scripts/serve.ts), one row per requested unpack.
  //   queued → running → succeeded | failed; running → interrupted (the service stopped mid-job; the
  //   next start queues it again and the pipeline's own crash recovery continues the work).
  // jobs_live: at most one live job per image, so a second request for it gets the existing job.
  `
  CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY,
    pool          TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('unpack')),
    state         TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','interrupted')),
    image         TEXT NOT NULL,
    source        TEXT NOT NULL,
    params        TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    result        TEXT,
    error_kind    TEXT,
    error_message TEXT,
    error_hint    TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER
  ) STRICT;
  CREATE UNIQUE INDEX jobs_live ON jobs (pool, image) WHERE state IN ('queued','running','interrupted');
  CREATE INDEX jobs_state ON jobs (pool, state, id);
  `,
  // 6: image lifecycle. An image removed by `remove`/`prune` keeps its row (snapshots reference it)
  // with removed_at set and no image_layers; each layer it alone referenced gets released_at, which
  // makes it collectable by GC (reason unreferenced_layer) once no image references it again.
  // Layers left by an unpack that failed half-way never get released_at: its re-run reuses them.
  `
  ALTER TABLE images ADD COLUMN removed_at INTEGER;
  ALTER TABLE layers ADD COLUMN released_at INTEGER;
  `,
];

export function migrate(db: Database): number {
  const current = (db.query("PRAGMA user_version").get() as { user_version: number }).user_version;
  if (current > MIGRATIONS.length) {
    return current; // newer schema from a newer thinimg: the caller refuses to run
  }
  for (let i = current; i < MIGRATIONS.length; i++) {
    db.transaction(() => {
      // another process opening a fresh state dir at the same moment may have applied it already:
      // the version read under the write lock decides
      const now = (db.query("PRAGMA user_version").get() as { user_version: number }).user_version;
      if (now > i) return;
      db.exec(MIGRATIONS[i]!);
      db.exec(`PRAGMA user_version = ${i + 1}`);
    }).immediate();
  }
  return MIGRATIONS.length;
}
