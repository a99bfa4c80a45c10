// Without --create: the pool directory and its record must be there (and name the --pool given).
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { DATA_FILE, META_FILE } from "../dm/loop-pool.ts";
import { ThinimgError } from "../errors.ts";
import { formatBytes } from "../util/units.ts";
import { type PoolRecord, readRecord, recordPath } from "./record.ts";
import type { RecoverRun } from "./run.ts";

function missingRecord(dir: string): ThinimgError {
  const present = [META_FILE, DATA_FILE].filter((f) => existsSync(join(dir, f)));
  const files = present.length ? `${present.join(" and ")} exist${present.length === 1 ? "s" : ""} there` : "no backing files exist there either";
  return new ThinimgError("missing", `no pool record ${recordPath(dir)} (${files})`, {
    hint: present.length
      ? "recover-pool rebuilds a pool only from its record: restore pool.json from a backup (docs/ops-recover-pool.md, 'Record missing')"
      : "nothing to recover here; to make a new pool use --create --data-size … --meta-size …",
  });
}

export function loadRecord(r: RecoverRun): PoolRecord {
  if (!existsSync(r.dir)) {
    throw new ThinimgError("missing", `pool directory ${r.dir} does not exist`, {
      hint: "check --dir (and that the filesystem holding it is mounted); to make a new pool use --create",
    });
  }
  if (!statSync(r.dir).isDirectory()) throw new ThinimgError("input", `${r.dir} is not a directory`, { hint: "check --dir" });
  r.takeLock("recover-pool");
  const rec = readRecord(r.dir);
  if (!rec) throw missingRecord(r.dir);
  if (r.o.pool !== undefined && r.o.pool !== rec.pool) {
    throw new ThinimgError("conflict", `${recordPath(r.dir)} is for pool ${rec.pool}, not ${r.o.pool}`, {
      hint: `drop --pool or use --pool ${rec.pool}; or point --dir at ${r.o.pool}'s directory`,
    });
  }
  r.pool = rec.pool;
  r.rb.note(
    "read-record",
    `${recordPath(r.dir)}: pool ${rec.pool}, state ${rec.state}, data ${formatBytes(rec.data_size)}, metadata ${formatBytes(rec.meta_size)}, block ${formatBytes(rec.block_size)}`,
  );
  return rec;
}
