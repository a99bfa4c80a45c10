// Bring the recorded pool up: its files as recorded, then — whether it is loaded or not — the path
// that makes it usable without ever reloading a live pool.
import { join } from "node:path";
import * as dmsetup from "../dm/dmsetup.ts";
import * as losetup from "../dm/losetup.ts";
import { type FileLoops, whenActive } from "./active.ts";
import { ensureFiles } from "./files.ts";
import { whenInactive } from "./inactive.ts";
import { fileId, loopsOf } from "./observe.ts";
import type { PoolRecord } from "./record.ts";
import type { RecoverRun } from "./run.ts";

export async function bringUp(r: RecoverRun, rec: PoolRecord): Promise<void> {
  await ensureFiles(r, rec);
  const all = await losetup.listDetailed({ pool_name: rec.pool });
  const loops: FileLoops = {
    all,
    meta: loopsOf(all, fileId(join(r.dir, rec.meta_file))),
    data: loopsOf(all, fileId(join(r.dir, rec.data_file))),
  };
  const info = await dmsetup.info(rec.pool);
  if (info) return whenActive(r, rec, info, loops);
  return whenInactive(r, rec, loops);
}
