// Active dm devices, classified against one pool: ours (our name prefix and a thin target on this
// pool — matched by the pool's major:minor in the table, which is what the kernel prints), foreign
// (on this pool without our prefix, or our prefix on something else) and unrelated (counted only).
// Two dmsetup calls in all (`info` and `table` for every device), so a thousand devices stay cheap.
import * as dmsetup from "../dm/dmsetup.ts";
import { classifyDmError, DmError } from "../dm/errors.ts";
import { parseThinTable } from "../dm/pool.ts";
import { udevArgs } from "../dm/udev.ts";
import { assertDmName } from "../dm/validate.ts";
import { ThinimgError } from "../errors.ts";
import { run } from "../exec.ts";
import type { DmDevice, DmScan, ForeignDevice } from "./model.ts";

/** `<prefix>-<pool>-`: every device thinimg makes on this pool starts with it. */
export function devicePrefix(prefix: string, pool: string): string {
  return `${prefix}-${pool}-`;
}

/**
 * Parse `dmsetup table` for all devices ("name: start len target args", one line per target) into
 * name → table text. Names are matched against the known set (from `dmsetup info`), longest first,
 * so a foreign name containing ": " cannot be misread.
 */
export function parseTableAll(out: string, names: Iterable<string>): Map<string, string> {
  const known = new Set(names);
  const byLength = [...known].sort((a, b) => b.length - a.length);
  const res = new Map<string, string>();
  for (const line of out.split("\n")) {
    if (!line.trim() || line.trim() === "No devices found") continue;
    let name: string | undefined;
    const cut = line.indexOf(": ");
    if (cut > 0 && known.has(line.slice(0, cut))) name = line.slice(0, cut);
    else name = byLength.find((n) => line.startsWith(`${n}:`));
    if (name === undefined) continue;
    const rest = line.slice(name.length + 1).trim();
    if (!rest) continue;
    const prev = res.get(name);
    res.set(name, prev ? `${prev}\n${rest}` : rest);
  }
  return res;
}

/** A device before its table is interpreted. */
export type RawDevice = Omit<DmDevice, "thin">;

/** Pure classification (unit-tested with fixtures). */
export function classifyDevices(poolName: string, prefix: string, devices: RawDevice[]): DmScan {
  const poolDev = devices.find((d) => d.name === poolName);
  if (!poolDev) {
    throw new ThinimgError("missing", `pool ${poolName} is not an active dm device`, {
      hint: "check --pool / THINIMG_POOL; `dmsetup ls --target thin-pool` lists pools",
    });
  }
  const poolMM = `${poolDev.major}:${poolDev.minor}`;
  const pre = devicePrefix(prefix, poolName);
  const ours: DmDevice[] = [];
  const foreign: ForeignDevice[] = [];
  let unrelated = 0;
  for (const d of devices) {
    if (d.name === poolName) continue;
    const thin = parseThinTable(d.table);
    const onPool = thin !== null && thin.poolMajorMinor === poolMM;
    const named = d.name.startsWith(pre);
    const dev: DmDevice = { ...d, thin };
    if (named && onPool) ours.push(dev);
    else if (named && d.table === null && /^[a-z]+-\d+$/.test(d.name.slice(pre.length))) {
      // e.g. `dmsetup create` killed between create and load: a name without a table holds nothing
      ours.push(dev);
    } else if (named) {
      const what = thin
        ? `a thin device of pool ${thin.poolMajorMinor}, not ${poolMM}`
        : d.table
          ? `a "${d.table.split(/\s+/)[2] ?? "?"}" target`
          : "a device with no table";
      foreign.push({ name: d.name, thinId: null, why: "prefix_other_target", detail: `has thinimg's prefix but is ${what}` });
    } else if (onPool) {
      foreign.push({
        name: d.name,
        thinId: thin!.thinId,
        why: "no_prefix_on_pool",
        detail: `thin id ${thin!.thinId} on this pool, named without the ${pre} prefix`,
      });
    } else unrelated++;
  }
  return { pool: { name: poolName, major: poolDev.major, minor: poolDev.minor, table: poolDev.table }, ours, foreign, unrelated };
}

/** Every device with its table, two dmsetup calls. */
export async function listDevices(o: { timeoutMs?: number } = {}): Promise<RawDevice[]> {
  const infos = await dmsetup.infoAll({ timeoutMs: o.timeoutMs });
  if (infos.length === 0) return [];
  const u = udevArgs();
  const r = await run(["dmsetup", ...u.flags, "table"], { timeoutMs: o.timeoutMs ?? 30_000, env: u.env });
  if (r.timedOut || r.exitCode !== 0) throw new DmError(classifyDmError(r), r);
  const tables = parseTableAll(
    r.stdout,
    infos.map((i) => i.name),
  );
  return infos.map((i) => ({
    name: i.name,
    major: i.major,
    minor: i.minor,
    open: i.open,
    suspended: i.state === "SUSPENDED",
    inactiveTable: i.inactive,
    // a device listed by info but printing no table line has no live table
    table: i.live ? (tables.get(i.name) ?? null) : null,
  }));
}

export async function scanDm(pool: string, prefix: string, o: { timeoutMs?: number } = {}): Promise<DmScan> {
  assertDmName(pool, "pool name");
  return classifyDevices(pool, prefix, await listDevices(o));
}
