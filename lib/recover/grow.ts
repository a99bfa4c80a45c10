// Growing a pool (recover-pool --grow-data / --grow-meta): the operator's procedure for a full pool
// as one command. Crash-safe through the record: the target sizes go into pool.json (`grow`) before
// anything changes, and any later run finishes a pending grow first. Each step is skipped when it is
// already done: extend the backing files (never shrink), refresh the loops (losetup --set-capacity),
// reload the pool table with the new length under a bounded suspend that is always resumed, verify
// the pool is rw, record the new sizes. A pool that is not loaded (a reboot mid-way) is grown on
// disk and then loaded from the grown record like any recovery.
import { join } from "node:path";
import * as dmsetup from "../dm/dmsetup.ts";
import { extendBackingFile, lowWaterMarkFor } from "../dm/loop-pool.ts";
import * as losetup from "../dm/losetup.ts";
import { type PoolTableParams, parsePoolTable, poolStatus, poolTable, reloadPool } from "../dm/pool.ts";
import { ThinimgError, usageError } from "../errors.ts";
import { formatBytes, parseSize } from "../util/units.ts";
import { bringUp } from "./bring-up.ts";
import { fileId, loopsOf, sameFeatures } from "./observe.ts";
import { MAX_META_SIZE, type PoolRecord, recordPath, writeRecord } from "./record.ts";
import { dmArgv, type RecoverRun } from "./run.ts";
import { Blocked, shellLine, sizeFileShell } from "./runbook.ts";
import { verify } from "./verify.ts";

/** "2G" (the new size) or "+512M" (that much more). */
export interface SizeArg {
  bytes: number;
  relative: boolean;
}

export interface GrowRequest {
  data?: SizeArg | undefined;
  meta?: SizeArg | undefined;
}

export function parseSizeArg(raw: string, flag: string): SizeArg {
  const relative = raw.startsWith("+");
  return { bytes: parseSize(relative ? raw.slice(1) : raw, flag), relative };
}

/** The kernel uses at most this much of a metadata device (THIN_METADATA_MAX_SECTORS). */
const KERNEL_META_MAX = 255 * (1 << 14) * 4096;
const META_BLOCK = 4096;

export interface GrowTargets {
  dataSize: number;
  metaSize: number;
}

/** The sizes to grow to: the request against the record, or the pending grow. Pure. */
export function growTargets(rec: PoolRecord, req: GrowRequest | undefined): GrowTargets {
  const target = (a: SizeArg | undefined, cur: number) => (a ? (a.relative ? cur + a.bytes : a.bytes) : cur);
  const t = { dataSize: target(req?.data, rec.data_size), metaSize: target(req?.meta, rec.meta_size) };
  const pending = rec.grow ?? null;
  if (pending && (req?.data || req?.meta) && (t.dataSize !== pending.data_size || t.metaSize !== pending.meta_size)) {
    throw new Blocked(
      "conflict",
      `an interrupted grow of pool ${rec.pool} (data ${formatBytes(pending.data_size)}, metadata ${formatBytes(pending.meta_size)}, started ${pending.started_at}) is not finished`,
      "finish it first (run recover-pool without --grow-data/--grow-meta), then grow again",
    );
  }
  if (pending) return { dataSize: pending.data_size, metaSize: pending.meta_size };
  if (t.dataSize < rec.data_size) {
    throw usageError(
      `--grow-data ${formatBytes(t.dataSize)} is smaller than the pool's data size ${formatBytes(rec.data_size)}: a pool never shrinks`,
      "give the new, larger size (e.g. --grow-data +1G)",
    );
  }
  if (t.dataSize % 512 !== 0) throw usageError(`--grow-data ${t.dataSize} bytes is not a multiple of 512`, "use e.g. --grow-data +1G");
  if (t.metaSize < rec.meta_size) {
    throw usageError(
      `--grow-meta ${formatBytes(t.metaSize)} is smaller than the pool's metadata size ${formatBytes(rec.meta_size)}: a pool never shrinks`,
      "give the new, larger size (e.g. --grow-meta +64M)",
    );
  }
  if (t.metaSize % META_BLOCK !== 0 || t.metaSize > MAX_META_SIZE) {
    throw usageError(`--grow-meta ${formatBytes(t.metaSize)} must be a multiple of 4K and at most 16G`, "use e.g. --grow-meta +64M");
  }
  return t;
}

/** The record once grown: sizes, data length and low water mark for the new size; no pending grow. Pure. */
export function grownRecord(rec: PoolRecord, t: GrowTargets, now: Date): PoolRecord {
  const blocks = Math.floor(t.dataSize / rec.block_size);
  return {
    ...rec,
    data_size: t.dataSize,
    meta_size: t.metaSize,
    data_sectors: blocks * rec.block_sectors,
    low_water_mark: lowWaterMarkFor(blocks),
    updated_at: now.toISOString(),
    grow: null,
  };
}

interface Live {
  params: PoolTableParams;
  table: ReturnType<typeof parsePoolTable>;
  suspended: boolean;
  metaLoop: losetup.LoopDetail;
  dataLoop: losetup.LoopDetail;
  metaTotal: number;
}

/** The loaded pool must be this directory's, as recorded (its length may already be the new one). */
async function checkLive(r: RecoverRun, rec: PoolRecord, next: PoolRecord, info: dmsetup.DmInfo): Promise<Live> {
  const name = rec.pool;
  const inspect = [shellLine(["dmsetup", "info", name]), shellLine(["dmsetup", "table", name]), shellLine(["losetup", "--list"])];
  if (!info.live || info.inactive) {
    throw new Blocked(
      "conflict",
      `pool ${name} has ${info.live ? "an inactive table waiting" : "no live table"}`,
      "bring it back first: run recover-pool without --grow-*",
      inspect,
    );
  }
  const t = parsePoolTable((await dmsetup.table(name)).split("\n")[0] ?? "");
  const loops = await losetup.listDetailed({ pool_name: name });
  const metaLoop = loopsOf(loops, fileId(join(r.dir, rec.meta_file))).find((l) => l.majMin === t.metaDev);
  const dataLoop = loopsOf(loops, fileId(join(r.dir, rec.data_file))).find((l) => l.majMin === t.dataDev);
  const diffs: string[] = [];
  if (!metaLoop) diffs.push(`its metadata device ${t.metaDev} is not a loop of ${join(r.dir, rec.meta_file)}`);
  if (!dataLoop) diffs.push(`its data device ${t.dataDev} is not a loop of ${join(r.dir, rec.data_file)}`);
  if (t.blockSectors !== rec.block_sectors) diffs.push(`block size ${t.blockSectors} sectors, recorded ${rec.block_sectors}`);
  if (!sameFeatures(t.features, rec.features)) diffs.push(`features [${t.features.join(" ")}], recorded [${rec.features.join(" ")}]`);
  if (t.dataSectors !== rec.data_sectors && t.dataSectors !== next.data_sectors) diffs.push(`length ${t.dataSectors} sectors, recorded ${rec.data_sectors}`);
  if (diffs.length)
    throw new Blocked(
      "conflict",
      `pool ${name} is not loaded as recorded: ${diffs.join("; ")}`,
      "recover-pool grows only the pool its record describes; check --dir",
      inspect,
    );
  const st = await poolStatus(name, { ctx: { pool_name: name } });
  if (st.kind !== "ok" || st.needsCheck) {
    throw new Blocked(
      "unhealthy",
      `pool ${name} is ${st.kind !== "ok" ? `in ${st.kind === "fail" ? "Fail" : "Error"} state` : "flagged needs_check"}: growing it does not help`,
      "take it out of use and run recover-pool without --grow-* (thin_check, --repair if told), then grow",
      [shellLine(["dmsetup", "status", name])],
    );
  }
  const params = {
    metaDev: metaLoop!.device,
    dataDev: dataLoop!.device,
    dataSectors: next.data_sectors,
    blockSectors: rec.block_sectors,
    lowWaterMark: next.low_water_mark,
    features: rec.features,
  };
  return { params, table: t, suspended: info.state === "SUSPENDED", metaLoop: metaLoop!, dataLoop: dataLoop!, metaTotal: st.metaTotal };
}

export async function growPool(r: RecoverRun, rec: PoolRecord, req: GrowRequest | undefined): Promise<void> {
  const t = growTargets(rec, req);
  const next = grownRecord(rec, t, r.probe.now());
  if (t.dataSize === rec.data_size && t.metaSize === rec.meta_size && !rec.grow) {
    r.rb.note("grow", `pool ${rec.pool} already has data ${formatBytes(rec.data_size)} and metadata ${formatBytes(rec.meta_size)}: nothing to grow`);
    return bringUp(r, rec);
  }
  const files = [
    ["metadata", join(r.dir, rec.meta_file), rec.meta_size, t.metaSize],
    ["data", join(r.dir, rec.data_file), rec.data_size, t.dataSize],
  ] as const;
  const sizes = files.map(([role, path, recorded]) => {
    const cur = fileId(path) ? Bun.file(path).size : -1;
    if (cur < recorded) {
      throw new ThinimgError("conflict", `${role} backing file ${path} is ${cur < 0 ? "missing" : `${cur} bytes`}; the record says ${recorded}`, {
        hint: "restore it; recover-pool grows only files that match their record",
      });
    }
    return cur;
  });
  const info = await dmsetup.info(rec.pool);
  const live = info ? await checkLive(r, rec, next, info) : null;
  r.rb.note(
    "grow",
    `pool ${rec.pool}${live ? "" : " (not loaded)"}: data ${formatBytes(rec.data_size)} → ${formatBytes(t.dataSize)}, metadata ${formatBytes(rec.meta_size)} → ${formatBytes(t.metaSize)}${rec.grow ? ` (finishing the grow started ${rec.grow.started_at})` : ""}`,
  );
  if (!rec.grow) {
    await r.rb.act(
      "write-record",
      `record the grow target in ${recordPath(r.dir)} before anything changes (a crash mid-way is finished by the next run)`,
      { planned: undefined },
      () => writeRecord(r.dir, { ...rec, grow: { data_size: t.dataSize, meta_size: t.metaSize, started_at: r.probe.now().toISOString() } }),
    );
  }
  for (const [i, [role, path, , size]] of files.entries()) {
    if (sizes[i]! >= size) continue;
    await r.rb.act(
      "extend-file",
      `extend the ${role} file ${path} from ${formatBytes(sizes[i]!)} to ${formatBytes(size)} (never shrinks)`,
      {
        argv: ["fallocate", "-l", String(size), path],
        shell: sizeFileShell(size, path),
        planned: undefined,
        done: (how) => `${path}: ${formatBytes(size)} via ${how}`,
      },
      () => extendBackingFile(path, size),
    );
  }
  if (!live) return growOffline(r, next);
  await refreshLoops(r, [
    ["metadata", live.metaLoop, t.metaSize],
    ["data", live.dataLoop, t.dataSize],
  ]);
  const metaBlocks = Math.floor(Math.min(t.metaSize, KERNEL_META_MAX) / META_BLOCK);
  const reload = live.table.dataSectors !== next.data_sectors || live.table.lowWaterMark !== next.low_water_mark || live.metaTotal < metaBlocks;
  if (reload || live.suspended) await reloadStep(r, rec.pool, live, reload);
  await verify(r, next, !r.rb.dryRun);
  r.devices = { metadata: live.params.metaDev, data: live.params.dataDev };
  const now = r.probe.now().toISOString();
  await r.rb.act("write-record", `record the new sizes in ${recordPath(r.dir)}`, { planned: undefined }, () =>
    writeRecord(r.dir, { ...next, state: "ready", last_transaction_id: r.status?.transaction_id ?? rec.last_transaction_id, last_seen_at: now }),
  );
  r.action = "grown";
}

/** The loops re-read their files' sizes (each only if it does not see the size yet). */
async function refreshLoops(r: RecoverRun, items: [string, losetup.LoopDetail, number][]): Promise<void> {
  for (const [role, loop, size] of items) {
    const seen = losetup.blockDeviceBytes(loop.majMin);
    if (seen !== null && seen >= size) continue;
    await r.rb.act(
      "refresh-loop",
      `${loop.device} re-reads the size of the ${role} file (${formatBytes(seen ?? 0)} → ${formatBytes(size)})`,
      { argv: ["losetup", "--set-capacity", loop.device], planned: undefined },
      async () => {
        await losetup.refreshCapacity(loop.device, { pool_name: r.pool ?? undefined });
        const now = losetup.blockDeviceBytes(loop.majMin);
        if (now !== null && now < size) {
          throw new ThinimgError("dm", `${loop.device} still sees ${formatBytes(now)} after losetup --set-capacity`, {
            hint: "check the file's size and `dmesg | tail`; re-run recover-pool",
          });
        }
      },
    );
  }
}

async function reloadStep(r: RecoverRun, name: string, live: Live, reload: boolean): Promise<void> {
  const table = poolTable(live.params);
  const d = (...a: string[]) => shellLine(dmArgv(...a).argv, undefined, dmArgv().env);
  if (!reload) {
    // a crash between the reload's suspend and resume: the new table is live, only resume
    await r.rb.act("resume-pool", `${name} was left suspended: resume it`, { ...dmArgv("resume", name), planned: undefined }, () => dmsetup.resume(name));
    return;
  }
  await r.rb.act(
    "reload-pool",
    `reload ${name} with ${live.params.dataSectors} data sectors (low water mark ${live.params.lowWaterMark}) under a bounded suspend, always resumed; the kernel picks up the larger devices`,
    {
      argv: dmArgv("reload", name, "--table", table).argv,
      shell: `${live.suspended ? "" : `${d("suspend", name)}; `}${d("reload", name, "--table", table)}; ${d("resume", name)}   # resume even if the reload failed`,
      planned: undefined,
    },
    async () => {
      if (!live.suspended) return reloadPool(name, live.params, { ctx: { pool_name: name } });
      await dmsetup.reload(name, table, { ctx: { pool_name: name } });
      await dmsetup.resume(name, { ctx: { pool_name: name } });
    },
  );
}

/** Not loaded: the files are grown; record the new sizes, then load it like any recovery. */
async function growOffline(r: RecoverRun, next: PoolRecord): Promise<void> {
  await r.rb.act("write-record", `record the new sizes in ${recordPath(r.dir)}`, { planned: undefined }, () => writeRecord(r.dir, next));
  if (r.rb.dryRun) {
    r.rb.steps.push({ name: "bring-up", status: "planned", argv: null, command: r.recoverCommand(), detail: "then load the pool from the grown record" });
    r.action = "grown";
    return;
  }
  // loops still attached to the files (the pool was removed, the loops not) see the old sizes
  const loops = await losetup.listDetailed({ pool_name: next.pool });
  await refreshLoops(r, [
    ...loopsOf(loops, fileId(join(r.dir, next.meta_file))).map((l): [string, losetup.LoopDetail, number] => ["metadata", l, next.meta_size]),
    ...loopsOf(loops, fileId(join(r.dir, next.data_file))).map((l): [string, losetup.LoopDetail, number] => ["data", l, next.data_size]),
  ]);
  await bringUp(r, next);
  r.action = "grown";
}
