// --create: the record first (state "creating"), before any file or device exists; then the rest is
// the same as a recovery. Re-running an interrupted --create with the same parameters finishes it.
import { existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { checkPoolName, DEFAULT_POOL } from "../config.ts";
import * as dmsetup from "../dm/dmsetup.ts";
import { assertFreeSpace } from "../dm/loop-pool.ts";
import { ThinimgError } from "../errors.ts";
import { formatBytes } from "../util/units.ts";
import { bringUp } from "./bring-up.ts";
import { sameFeatures } from "./observe.ts";
import { type CreateSpec, newRecord, type PoolRecord, readRecord, recordPath, writeRecord } from "./record.ts";
import type { RecoverRun } from "./run.ts";
import { Blocked, shellLine } from "./runbook.ts";

const sameParameters = (a: PoolRecord, b: PoolRecord) =>
  a.pool === b.pool && a.meta_size === b.meta_size && a.data_size === b.data_size && a.block_size === b.block_size && sameFeatures(a.features, b.features);

/** A record is already there: continue its interrupted --create if it asked for the same pool. */
function continueCreate(r: RecoverRun, existing: PoolRecord, wanted: PoolRecord): PoolRecord {
  const bringBack = [shellLine(["bun", "ops/recover-pool.ts", "--dir", r.dir])];
  if (existing.state === "ready") {
    throw new Blocked(
      "conflict",
      `${r.dir} already holds pool ${existing.pool} (created ${existing.created_at}); refusing to create over it`,
      "to bring that pool back, run without --create",
      bringBack,
    );
  }
  if (!sameParameters(existing, wanted)) {
    throw new Blocked(
      "conflict",
      `${r.dir} holds an interrupted --create of pool ${existing.pool} (data ${formatBytes(existing.data_size)}, metadata ${formatBytes(existing.meta_size)}, block ${formatBytes(existing.block_size)}) with other parameters`,
      "finish it with the recorded parameters (run without --create), or, if nothing there matters, empty the directory and create again",
      bringBack,
    );
  }
  r.rb.note("read-record", `${recordPath(r.dir)}: interrupted --create of pool ${existing.pool}; continuing it`);
  return existing;
}

/** A new pool: nothing of it may exist yet; then its record is written. */
async function startCreate(r: RecoverRun, rec: PoolRecord): Promise<PoolRecord> {
  for (const f of [rec.meta_file, rec.data_file]) {
    const p = join(r.dir, f);
    if (existsSync(p)) {
      throw new Blocked(
        "conflict",
        `${p} already exists and ${recordPath(r.dir)} does not: refusing to overwrite a backing file`,
        "if it is a pool's file, restore its pool.json (docs/ops-recover-pool.md, 'Record missing'); otherwise choose another --dir",
      );
    }
  }
  if (await dmsetup.info(rec.pool)) {
    throw new Blocked(
      "conflict",
      `a device-mapper device named ${rec.pool} already exists`,
      "choose another --pool, or bring that pool back from its own directory (without --create)",
      [shellLine(["dmsetup", "table", rec.pool])],
    );
  }
  // Before anything is written: a pool bigger than the free space would fail under its users.
  assertFreeSpace(r.dir, rec.meta_size + rec.data_size, `${rec.meta_file} and ${rec.data_file}`);
  const detail = `record the pool's parameters in ${recordPath(r.dir)} (state creating) before any file or device exists`;
  await r.rb.act("write-record", detail, { planned: undefined }, () => writeRecord(r.dir, rec));
  return rec;
}

export async function create(r: RecoverRun, s: Required<CreateSpec>): Promise<void> {
  const name = r.o.pool !== undefined ? checkPoolName(r.o.pool, "--pool") : (r.o.defaultPool ?? DEFAULT_POOL);
  r.pool = name;
  const dirExists = existsSync(r.dir);
  if (dirExists && !statSync(r.dir).isDirectory()) {
    throw new ThinimgError("input", `${r.dir} exists and is not a directory`, { hint: "choose another --dir" });
  }
  if (!dirExists) {
    await r.rb.act("mkdir", `create ${r.dir}`, { argv: ["mkdir", "-p", r.dir], planned: undefined }, () => {
      mkdirSync(r.dir, { recursive: true, mode: 0o750 });
    });
  }
  r.takeLock("recover-pool --create");
  const existing = dirExists ? readRecord(r.dir) : null;
  const wanted = newRecord(name, s, r.probe.now());
  const rec = existing ? continueCreate(r, existing, wanted) : await startCreate(r, wanted);
  await bringUp(r, rec);
}
