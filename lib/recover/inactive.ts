// The pool is not loaded: attach its files (or reuse their loops), thin_check the metadata, load the
// pool from the record, verify it and mark the record ready. Its files must not be under another
// pool (this one active under another name): a second pool on the same metadata would destroy it.
import { join } from "node:path";
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import * as losetup from "../dm/losetup.ts";
import { parsePoolTable, poolTable } from "../dm/pool.ts";
import { ThinimgError } from "../errors.ts";
import type { FileLoops } from "./active.ts";
import { checkMetadata } from "./check-metadata.ts";
import type { PoolRecord } from "./record.ts";
import { dmArgv, type RecoverRun } from "./run.ts";
import { Blocked, shellLine } from "./runbook.ts";
import { markReady, verify } from "./verify.ts";

/** Refuse when a loop of our files backs another loaded pool. */
async function assertNotInAnotherPool(r: RecoverRun, rec: PoolRecord, loops: FileLoops): Promise<void> {
  const ours = new Map<string, string>();
  for (const l of loops.meta) ours.set(l.majMin, rec.meta_file);
  for (const l of loops.data) ours.set(l.majMin, rec.data_file);
  if (ours.size === 0) return;
  for (const p of await dmsetup.ls("thin-pool")) {
    const tl = (await dmsetup.table(p.name)).split("\n")[0] ?? "";
    let t: ReturnType<typeof parsePoolTable>;
    try {
      t = parsePoolTable(tl);
    } catch {
      continue;
    }
    const hit = ours.get(t.metaDev) ?? ours.get(t.dataDev);
    if (!hit) continue;
    throw new Blocked(
      "conflict",
      `${join(r.dir, hit)} is in use by the active pool ${p.name} (the record names ${rec.pool})`,
      `this directory's pool is active under another name; use that pool, or deactivate it first — never load the same files twice`,
      [shellLine(["dmsetup", "table", p.name]), shellLine(["losetup", "--list"])],
    );
  }
}

/** The pool's table; in a dry run, devices not attached yet stay shell variables. */
export function tableFor(rec: PoolRecord, metaDev: string, dataDev: string): string {
  const p = { metaDev, dataDev, dataSectors: rec.data_sectors, blockSectors: rec.block_sectors, lowWaterMark: rec.low_water_mark, features: rec.features };
  if (!metaDev.startsWith("$") && !dataDev.startsWith("$")) return poolTable(p);
  return `0 ${p.dataSectors} thin-pool ${metaDev} ${dataDev} ${p.blockSectors} ${p.lowWaterMark} ${p.features.length}${p.features.map((f) => ` ${f}`).join("")}`;
}

/** A writable loop of `path`: one already attached (the first; others are left alone), or a new one. */
async function loopFor(r: RecoverRun, role: string, path: string, found: losetup.LoopDetail[], variable: string, pool: string): Promise<string> {
  const usable = found.filter((l) => !l.readOnly);
  if (usable.length) {
    const others = usable.slice(1).map((l) => l.device);
    const extra = others.length ? ` (also attached on ${others.join(", ")}; left alone)` : "";
    r.rb.note("reuse-loop", `${role} file already attached on ${usable[0]!.device}${extra}`);
    return usable[0]!.device;
  }
  if (found.length) {
    throw new Blocked(
      "conflict",
      `${path} is attached read-only on ${found.map((l) => l.device).join(", ")}; the pool needs it writable`,
      "detach it and re-run",
      [...found.map((l) => shellLine(["losetup", "--detach", l.device])), r.recoverCommand()],
    );
  }
  try {
    return await r.rb.act(
      "attach-loop",
      `attach ${role} file ${path}`,
      { argv: ["losetup", "--find", "--show", path], assign: variable, planned: `$${variable}`, done: (dev) => `${role} file ${path} on ${dev}` },
      () => losetup.attach(path, { ctx: { pool_name: pool } }),
    );
  } catch (e) {
    throw new ThinimgError("dm", `could not attach a loop device to ${path}: ${e instanceof ThinimgError ? e.message : String(e)}`, {
      hint: "check that the loop module is loaded and a loop device is free (losetup --find); nothing else was changed",
    });
  }
}

/** dmsetup create from the record; a failure leaves everything as it is. */
async function loadPool(r: RecoverRun, name: string, table: string): Promise<void> {
  const d = dmArgv("create", name, "--table", table);
  try {
    await r.rb.act("create-pool", `load pool ${name} from the record`, { ...d, planned: undefined }, () =>
      dmsetup.create(name, table, { ctx: { pool_name: name } }),
    );
  } catch (e) {
    if (isDmError(e, "exists")) {
      throw new Blocked("conflict", `device ${name} appeared while recovering (another process?)`, "re-run recover-pool to check it", [r.recoverCommand()]);
    }
    const msg = e instanceof ThinimgError ? e.message : String(e);
    throw new Blocked(
      "dm",
      `loading pool ${name} failed: ${msg}`,
      "nothing was removed. Check `dmesg | tail` for device-mapper errors; 'unknown target type' means dm-thin-pool is not loaded (modprobe dm-thin-pool)",
      ["dmesg | tail -20", r.recoverCommand()],
    );
  }
}

export async function whenInactive(r: RecoverRun, rec: PoolRecord, loops: FileLoops): Promise<void> {
  const name = rec.pool;
  await assertNotInAnotherPool(r, rec, loops);
  const metaDev = await loopFor(r, "metadata", join(r.dir, rec.meta_file), loops.meta, "META_DEV", name);
  const dataDev = await loopFor(r, "data", join(r.dir, rec.data_file), loops.data, "DATA_DEV", name);
  r.devices = { metadata: metaDev, data: dataDev };
  const checkedMeta = await checkMetadata(r, rec, metaDev);
  r.devices.metadata = checkedMeta;
  await loadPool(r, name, tableFor(rec, checkedMeta, dataDev));
  await verify(r, rec, !r.rb.dryRun);
  await markReady(r, rec);
  r.action = rec.state === "creating" ? "created" : "recovered";
}
