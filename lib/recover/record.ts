// The pool record: DIR/pool.json, written beside the backing files. It is the only source of truth
// recover-pool rebuilds the pool table from, so it is written BEFORE any file or dm state exists
// (state "creating") and flipped to "ready" once the pool has been seen rw. Always written atomically
// (temp file, fsync, rename, fsync dir): a crash leaves the old record or the new one, never half.
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, renameSync, writeSync } from "node:fs";
import { join } from "node:path";
import * as v from "valibot";
import { DATA_FILE, DEFAULT_FEATURES, lowWaterMarkFor, META_FILE } from "../dm/loop-pool.ts";
import { SECTOR } from "../dm/pool.ts";
import { ThinimgError } from "../errors.ts";
import { formatBytes } from "../util/units.ts";
import { THINIMG_VERSION } from "../version.ts";

export const RECORD_FILE = "pool.json";
export const RECORD_FORMAT = 1;
export { THINIMG_VERSION };

const FileName = v.pipe(v.string(), v.regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$/, "must be a plain file name in the pool directory"));
const PosInt = v.pipe(v.number(), v.integer(), v.minValue(1));

const RecordSchema = v.object({
  format: v.literal(RECORD_FORMAT),
  pool: v.pipe(v.string(), v.regex(/^[A-Za-z0-9][A-Za-z0-9._+-]{0,126}$/, "invalid pool name")),
  state: v.picklist(["creating", "ready"]),
  meta_file: FileName,
  data_file: FileName,
  meta_size: PosInt,
  data_size: PosInt,
  block_size: PosInt,
  block_sectors: PosInt,
  data_sectors: PosInt,
  low_water_mark: PosInt,
  features: v.array(v.picklist(["skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space"])),
  created_at: v.string(),
  updated_at: v.string(),
  thinimg_version: v.string(),
  repairs: v.array(v.object({ at: v.string(), kept: FileName, transaction_id: v.nullable(v.number()) })),
  /** The pool's transaction id when recover-pool last saw it healthy: thin_repair needs one when the
   * superblock itself is destroyed (--transaction-id overrides it). */
  last_transaction_id: v.nullable(v.pipe(v.number(), v.integer(), v.minValue(0))),
  last_seen_at: v.nullable(v.string()),
  /** A grow in progress (recover-pool --grow-data/--grow-meta): the target sizes, written before
   * anything changes, so that the next run finishes it after a crash. */
  grow: v.optional(v.nullable(v.object({ data_size: PosInt, meta_size: PosInt, started_at: v.string() }))),
});

export type PoolRecord = v.InferOutput<typeof RecordSchema>;

export function recordPath(dir: string): string {
  return join(dir, RECORD_FILE);
}

/** The record, or null when DIR/pool.json does not exist. Throws a one-line error when unreadable. */
export function readRecord(dir: string): PoolRecord | null {
  const p = recordPath(dir);
  if (!existsSync(p)) return null;
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(p, "utf8"));
  } catch (e) {
    throw new ThinimgError("input", `${p} is not valid JSON (${(e as Error).message})`, {
      hint: "restore it from a backup; the backing files are untouched (see docs/ops-recover-pool.md, 'Record damaged')",
    });
  }
  const r = v.safeParse(RecordSchema, raw);
  if (!r.success) {
    const issue = r.issues[0];
    throw new ThinimgError("input", `${p}: ${v.getDotPath(issue) ?? "record"}: ${issue.message}`, {
      hint: "restore the record from a backup or fix the named field; the backing files are untouched",
    });
  }
  const rec = r.output;
  if (rec.block_sectors * 512 !== rec.block_size || rec.data_sectors % rec.block_sectors !== 0) {
    throw new ThinimgError("input", `${p}: block_size/block_sectors/data_sectors are inconsistent`, {
      hint: "restore the record from a backup",
    });
  }
  return rec;
}

/** Write the record atomically: temp file in the same dir, fsync, rename over, fsync the dir. */
export function writeRecord(dir: string, rec: PoolRecord): void {
  const checked = v.parse(RecordSchema, rec);
  const final = recordPath(dir);
  const tmp = `${final}.tmp-${process.pid}`;
  const fd = openSync(tmp, "w", 0o644);
  try {
    writeSync(fd, `${JSON.stringify(checked, null, 2)}\n`);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, final);
  try {
    const dfd = openSync(dir, "r");
    try {
      fsyncSync(dfd);
    } finally {
      closeSync(dfd);
    }
  } catch {
    // some filesystems (hostfs) cannot fsync a directory; the rename itself is still atomic
  }
}

export interface CreateSpec {
  dataSize: number;
  metaSize: number;
  /** Bytes; default 64 KiB. */
  blockSize?: number;
  features?: string[];
}

export const MIN_META_SIZE = 2 * 1024 ** 2;
/** The kernel uses at most ~15.9 GiB of a metadata device; more is wasted. */
export const MAX_META_SIZE = 16 * 1024 ** 3;

export function validateCreateSpec(c: CreateSpec): Required<CreateSpec> {
  const blockSize = c.blockSize ?? 64 * 1024;
  if (blockSize % (64 * 1024) !== 0 || blockSize < 64 * 1024 || blockSize > 1024 ** 3) {
    throw new ThinimgError("usage", `--block-size ${formatBytes(blockSize)} must be a multiple of 64K between 64K and 1G`, {
      hint: "use e.g. --block-size 64K (the default) or 1M",
    });
  }
  if (c.metaSize < MIN_META_SIZE || c.metaSize > MAX_META_SIZE || c.metaSize % 4096 !== 0) {
    throw new ThinimgError("usage", `--meta-size ${formatBytes(c.metaSize)} must be a multiple of 4K between 2M and 16G`, {
      hint: "use e.g. --meta-size 64M (about 1/1000 of the data size, at least 2M)",
    });
  }
  if (c.dataSize < blockSize || c.dataSize % SECTOR !== 0) {
    throw new ThinimgError(
      "usage",
      `--data-size ${formatBytes(c.dataSize)} must be a multiple of 512 bytes and at least one block (${formatBytes(blockSize)})`,
      {
        hint: "use e.g. --data-size 2G",
      },
    );
  }
  return { dataSize: c.dataSize, metaSize: c.metaSize, blockSize, features: c.features ?? DEFAULT_FEATURES };
}

export function newRecord(pool: string, spec: Required<CreateSpec>, now: Date): PoolRecord {
  const blockSectors = spec.blockSize / SECTOR;
  const dataBlocks = Math.floor(spec.dataSize / spec.blockSize);
  return {
    format: RECORD_FORMAT,
    pool,
    state: "creating",
    meta_file: META_FILE,
    data_file: DATA_FILE,
    meta_size: spec.metaSize,
    data_size: spec.dataSize,
    block_size: spec.blockSize,
    block_sectors: blockSectors,
    data_sectors: dataBlocks * blockSectors,
    low_water_mark: lowWaterMarkFor(dataBlocks),
    features: [...spec.features] as PoolRecord["features"],
    created_at: now.toISOString(),
    updated_at: now.toISOString(),
    thinimg_version: THINIMG_VERSION,
    repairs: [],
    last_transaction_id: null,
    last_seen_at: null,
  };
}
