// The pool is already loaded: it must be this directory's pool with the recorded table. It is never
// reloaded; a suspended one is resumed, then its status verified. A healthy pool changes nothing.
import { join } from "node:path";
import * as dmsetup from "../dm/dmsetup.ts";
import type * as losetup from "../dm/losetup.ts";
import { parsePoolTable } from "../dm/pool.ts";
import { sameFeatures } from "./observe.ts";
import type { PoolRecord } from "./record.ts";
import { dmArgv, type RecoverRun } from "./run.ts";
import { Blocked, shellLine } from "./runbook.ts";
import { markReady, verify } from "./verify.ts";

export interface FileLoops {
  /** Every loop device on the host. */
  all: losetup.LoopDetail[];
  meta: losetup.LoopDetail[];
  data: losetup.LoopDetail[];
}

type PoolTable = ReturnType<typeof parsePoolTable>;

function describeDev(majMin: string, loops: losetup.LoopDetail[]): string {
  const l = loops.find((x) => x.majMin === majMin);
  return l ? `${majMin} (${l.device} → ${l.backingFile}${l.deleted ? " (deleted)" : ""})` : majMin;
}

/** The live table of `name`, which must be one thin-pool target. */
async function liveTable(name: string, inspect: string[]): Promise<PoolTable> {
  const lines = (await dmsetup.table(name)).split("\n").filter((l) => l.trim());
  try {
    if (lines.length !== 1) throw new Error("several targets");
    return parsePoolTable(lines[0]!);
  } catch {
    throw new Blocked(
      "conflict",
      `device ${name} is active but is not a thin-pool (table: ${lines.join(" | ")})`,
      "another device uses this name; choose another --pool",
      inspect,
    );
  }
}

/** How the live table differs from the record (empty: it is the recorded pool). */
function tableDiffs(r: RecoverRun, rec: PoolRecord, t: PoolTable, loops: FileLoops): string[] {
  const diffs: string[] = [];
  if (!loops.meta.some((l) => l.majMin === t.metaDev)) {
    diffs.push(`metadata device is ${describeDev(t.metaDev, loops.all)}, not a loop of ${join(r.dir, rec.meta_file)}`);
  }
  if (!loops.data.some((l) => l.majMin === t.dataDev)) {
    diffs.push(`data device is ${describeDev(t.dataDev, loops.all)}, not a loop of ${join(r.dir, rec.data_file)}`);
  }
  if (t.dataSectors !== rec.data_sectors) diffs.push(`length ${t.dataSectors} sectors, recorded ${rec.data_sectors}`);
  if (t.blockSectors !== rec.block_sectors) diffs.push(`block size ${t.blockSectors} sectors, recorded ${rec.block_sectors}`);
  if (t.lowWaterMark !== rec.low_water_mark) diffs.push(`low water mark ${t.lowWaterMark}, recorded ${rec.low_water_mark}`);
  if (!sameFeatures(t.features, rec.features)) diffs.push(`features [${t.features.join(" ")}], recorded [${rec.features.join(" ")}]`);
  return diffs;
}

/** The loaded pool as it is: refuse anything but the recorded table with nothing pending. */
async function assertRecordedTable(r: RecoverRun, rec: PoolRecord, info: dmsetup.DmInfo, loops: FileLoops): Promise<PoolTable> {
  const name = rec.pool;
  const inspect = [shellLine(["dmsetup", "info", name]), shellLine(["dmsetup", "table", name]), shellLine(["losetup", "--list"])];
  if (!info.live) {
    throw new Blocked(
      "conflict",
      `device ${name} exists but has no live table`,
      "if it is a leftover of an interrupted run, remove it (dmsetup remove) and re-run; recover-pool never loads a table into an existing device",
      [...inspect, shellLine(["dmsetup", "table", "--inactive", name])],
    );
  }
  const t = await liveTable(name, inspect);
  const diffs = tableDiffs(r, rec, t, loops);
  if (diffs.length) {
    throw new Blocked(
      "conflict",
      `pool ${name} is active with a different table: ${diffs.join("; ")}`,
      "recover-pool never reloads a live pool. If --dir is the wrong directory, use the right one; otherwise stop what uses the pool, remove its thin devices and the pool (dmsetup remove, no --force) and re-run",
      inspect,
    );
  }
  if (info.inactive) {
    throw new Blocked(
      "conflict",
      `pool ${name} has an inactive table loaded (a reload that was never resumed); a resume would swap it in`,
      "inspect it and drop it with dmsetup clear, then re-run",
      [shellLine(["dmsetup", "table", "--inactive", name]), shellLine(["dmsetup", "clear", name]), r.recoverCommand()],
    );
  }
  return t;
}

export async function whenActive(r: RecoverRun, rec: PoolRecord, info: dmsetup.DmInfo, loops: FileLoops): Promise<void> {
  const name = rec.pool;
  const t = await assertRecordedTable(r, rec, info, loops);
  const metaDev = loops.meta.find((l) => l.majMin === t.metaDev)!.device;
  const dataDev = loops.data.find((l) => l.majMin === t.dataDev)!.device;
  r.devices = { metadata: metaDev, data: dataDev };
  r.rb.note("pool-active", `${name} is active with the recorded table (metadata ${metaDev}, data ${dataDev})`, "ok", ["dmsetup", "table", name]);
  let changed = false;
  if (info.state === "SUSPENDED") {
    const d = dmArgv("resume", name);
    await r.rb.act("resume-pool", `${name} was left suspended: resume it`, { ...d, planned: undefined }, () => dmsetup.resume(name));
    changed = true;
  }
  await verify(r, rec, true); // status reads fine on a suspended device
  // A healthy pool changes nothing, not even the record.
  if (rec.state === "creating" || changed) await markReady(r, rec);
  r.action = rec.state === "creating" ? "created" : changed ? "recovered" : "healthy";
}
