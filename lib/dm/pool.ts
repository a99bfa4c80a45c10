// Pool-level operations: thin-pool table, status, and the pool messages that create, snapshot and
// delete thin ids. The pool's transaction id is a compare-and-swap register that callers use to
// record "this change happened" atomically with the metadata commit.
import { ThinimgError } from "../errors.ts";
import * as dmsetup from "./dmsetup.ts";
import { dmRefusal } from "./errors.ts";
import { type PoolStatus, type PoolStatusOk, parsePoolStatus } from "./status.ts";
import { assertDevPath, assertDmName, assertThinId, assertUint } from "./validate.ts";

export const SECTOR = 512;

export interface PoolTableParams {
  metaDev: string;
  dataDev: string;
  /** Data device length in 512-byte sectors. */
  dataSectors: number;
  /** Pool block size in sectors (64 KiB = 128); multiple of 128, 128..2097152. */
  blockSectors: number;
  /** In pool blocks: the pool raises an event when free data blocks drop below this. */
  lowWaterMark: number;
  /** e.g. ["error_if_no_space"], ["skip_block_zeroing"]. */
  features: string[];
}

const FEATURES = new Set(["skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space"]);

export function poolTable(p: PoolTableParams): string {
  assertDevPath(p.metaDev);
  assertDevPath(p.dataDev);
  assertUint(p.dataSectors, "data sectors");
  assertUint(p.lowWaterMark, "low water mark");
  if (p.blockSectors < 128 || p.blockSectors > 2097152 || p.blockSectors % 128 !== 0) {
    throw dmRefusal(["thin-pool"], `block size ${p.blockSectors} sectors must be a multiple of 128 (64 KiB) between 64 KiB and 1 GiB`);
  }
  for (const f of p.features) if (!FEATURES.has(f)) throw new Error(`unknown thin-pool feature ${f}`);
  const feat = p.features.length ? ` ${p.features.length} ${p.features.join(" ")}` : " 0";
  return `0 ${p.dataSectors} thin-pool ${p.metaDev} ${p.dataDev} ${p.blockSectors} ${p.lowWaterMark}${feat}`;
}

/**
 * Load a new table into a live pool (a longer data device, a grown metadata device): a bounded
 * suspend, the reload, the resume that swaps it in — resumed whatever happens (withSuspended).
 */
export async function reloadPool(pool: string, p: PoolTableParams, o: dmsetup.DmOpts = {}): Promise<void> {
  assertDmName(pool, "pool name");
  const table = poolTable(p);
  const opts = { ...o, ctx: { pool_name: pool, ...o.ctx } };
  await dmsetup.withSuspended(pool, () => dmsetup.reload(pool, table, opts), opts);
}

/** Parsed pool status; DmError not_found when the pool does not exist. */
export async function poolStatus(pool: string, o: dmsetup.DmOpts = {}): Promise<PoolStatus> {
  assertDmName(pool, "pool name");
  return parsePoolStatus(await dmsetup.status(pool, { ...o, ctx: { pool_name: pool, ...o.ctx } }));
}

/** Pool status that must be usable (not Fail/Error). */
export async function poolStatusOk(pool: string, o: dmsetup.DmOpts = {}): Promise<PoolStatusOk> {
  const s = await poolStatus(pool, o);
  if (s.kind !== "ok") {
    throw dmRefusal(
      ["dmsetup", "status", pool],
      `pool ${pool} is in ${s.kind === "fail" ? "Fail" : "Error"} state`,
      "run `bun scripts/health.ts` and follow docs/ops-recover-pool.md",
    );
  }
  return s;
}

const ctxFor = (pool: string, id?: number) => ({ pool_name: pool, device_id: id });

export async function createThin(pool: string, id: number, o: dmsetup.DmOpts = {}) {
  assertThinId(id);
  await dmsetup.message(pool, `create_thin ${id}`, { ...o, ctx: ctxFor(pool, id) });
}

/** Snapshot of origin. The origin should be inactive (no suspend needed); if active, the caller
 * must suspend it around this call (dmsetup.withSuspended) or the snapshot may miss in-flight I/O. */
export async function createSnap(pool: string, id: number, originId: number, o: dmsetup.DmOpts = {}) {
  assertThinId(id);
  assertThinId(originId);
  await dmsetup.message(pool, `create_snap ${id} ${originId}`, { ...o, ctx: ctxFor(pool, id) });
}

export async function deleteThin(pool: string, id: number, o: dmsetup.DmOpts = {}) {
  assertThinId(id);
  await dmsetup.message(pool, `delete ${id}`, { ...o, ctx: ctxFor(pool, id) });
}

export async function setTransactionId(pool: string, from: number, to: number, o: dmsetup.DmOpts = {}) {
  assertUint(from, "transaction id");
  assertUint(to, "transaction id");
  await dmsetup.message(pool, `set_transaction_id ${from} ${to}`, { ...o, ctx: ctxFor(pool) });
}

export async function reserveMetadataSnap(pool: string, o: dmsetup.DmOpts = {}) {
  await dmsetup.message(pool, "reserve_metadata_snap", { ...o, ctx: ctxFor(pool) });
}

export async function releaseMetadataSnap(pool: string, o: dmsetup.DmOpts = {}) {
  await dmsetup.message(pool, "release_metadata_snap", { ...o, ctx: ctxFor(pool) });
}

export function sectorsFor(sizeBytes: number): number {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR !== 0) {
    throw dmRefusal(["thin"], `size ${sizeBytes} must be a positive multiple of 512 bytes`);
  }
  return sizeBytes / SECTOR;
}

export function thinTable(pool: string, id: number, sizeBytes: number): string {
  assertDmName(pool, "pool name");
  assertThinId(id);
  return `0 ${sectorsFor(sizeBytes)} thin ${dmsetup.mapperPath(pool)} ${id}`;
}

/** A single thin target line "start len thin <pool M:m> <id> [origin]" (as the kernel prints
 * thinTable's line) → its parts, else null. */
export function parseThinTable(table: string | null): { poolMajorMinor: string; thinId: number; sectors: number } | null {
  if (!table) return null;
  const lines = table.split("\n").filter((l) => l.trim());
  if (lines.length !== 1) return null;
  const t = lines[0]!.trim().split(/\s+/);
  if (t[2] !== "thin" || t.length < 5 || t[0] !== "0") return null;
  if (!/^\d+:\d+$/.test(t[3]!) || !/^\d+$/.test(t[4]!) || !/^\d+$/.test(t[1]!)) return null;
  return { poolMajorMinor: t[3]!, thinId: Number(t[4]), sectors: Number(t[1]) };
}

/** The pool's major:minor (thin tables name the pool by it). */
export async function poolMajorMinor(poolName: string): Promise<string> {
  const i = await dmsetup.info(poolName);
  if (!i) throw new ThinimgError("missing", `pool ${poolName} does not exist`, { hint: "create it with `bun ops/recover-pool.ts --create` or pass --pool" });
  return `${i.major}:${i.minor}`;
}

/** A loaded device `name` must map exactly thin id `id` of `pool` (a resumed or re-attached load
 * finds it there); anything else is not ours to touch. */
export async function assertThinDevice(pool: string, name: string, id: number): Promise<void> {
  const [table, mm] = await Promise.all([dmsetup.table(name), poolMajorMinor(pool)]);
  const t = parseThinTable(table);
  if (!t || t.poolMajorMinor !== mm || t.thinId !== id) {
    throw new ThinimgError("conflict", `device ${name} exists with another table (${table.trim()}), not thin id ${id} of pool ${pool}`, {
      hint: "it is not ours to touch: inspect it with `dmsetup table`, then `bun scripts/gc.ts` to review",
    });
  }
}

/** Load a thin device for `id` as /dev/mapper/<name>. */
export async function activateThin(
  pool: string,
  name: string,
  id: number,
  sizeBytes: number,
  o: dmsetup.DmOpts & { readOnly?: boolean; uuid?: string } = {},
): Promise<string> {
  await dmsetup.create(name, thinTable(pool, id, sizeBytes), {
    ...o,
    ctx: { pool_name: pool, device_id: id, device_name: name, ...o.ctx },
  });
  return dmsetup.mapperPath(name);
}

/** Parse a thin-pool table line back into its parts (recover-pool compares against records). */
export function parsePoolTable(line: string): PoolTableParams & { lengthSectors: number } {
  const t = line.trim().split(/\s+/);
  if (t[2] !== "thin-pool" || t.length < 8) throw new Error(`not a thin-pool table: ${line}`);
  const nf = Number(t[7]);
  return {
    lengthSectors: Number(t[1]),
    dataSectors: Number(t[1]),
    metaDev: t[3]!,
    dataDev: t[4]!,
    blockSectors: Number(t[5]),
    lowWaterMark: Number(t[6]),
    features: t.slice(8, 8 + nf),
  };
}
