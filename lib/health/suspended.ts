// A suspended pool (or a suspended thinimg device on it) queues every I/O: status still reads fine,
// the pool messages still succeed — so without this check health says "healthy", activate sends
// create_snap, and the `dmsetup create` after it fails with the thin id leaked. Read from sysfs
// (/sys/block/dm-N/dm/suspended: a flag, it never waits on the device) so the pre-flight spawns no
// extra command; one `dmsetup info` where sysfs cannot tell.
import { DEVICE_PREFIX } from "../config.ts";
import { activeDevices } from "../dm/active.ts";
import { infoAll } from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { errorMessage } from "../errors.ts";
import { RUNBOOK } from "./runbook.ts";
import { type CheckResult, result } from "./types.ts";

const NAME = "pool.suspended";

type DeviceState = { name: string; state: string };

/** Decide on every device's state, SUSPENDED or ACTIVE (pure). */
export function judgeSuspended(pool: string, infos: DeviceState[]): CheckResult {
  const mine = `${DEVICE_PREFIX}-${pool}-`;
  const p = infos.find((d) => d.name === pool);
  const devices = infos.filter((d) => d.name.startsWith(mine) && d.state === "SUSPENDED").map((d) => d.name);
  if (p?.state === "SUSPENDED") {
    const also = devices.length ? ` (and ${devices.length} thinimg device(s): ${devices.join(", ")})` : "";
    return result(NAME, "block", `pool ${pool} is SUSPENDED (dmsetup info: State SUSPENDED): every I/O on its devices waits${also}`, RUNBOOK.poolSuspended, {
      pool_state: "SUSPENDED",
      suspended_devices: devices,
    });
  }
  if (devices.length) {
    return result(
      NAME,
      "block",
      `thinimg device(s) SUSPENDED (dmsetup info: State SUSPENDED): ${devices.join(", ")}; their users' I/O waits`,
      RUNBOOK.deviceSuspended,
      { pool_state: p?.state ?? null, suspended_devices: devices },
    );
  }
  return result(NAME, "ok", `pool ${pool} and its thinimg devices are active (not suspended)`, "", { pool_state: p?.state ?? null, suspended_devices: [] });
}

/** Device states from sysfs; null when sysfs cannot tell for every device. */
async function sysfsStates(): Promise<DeviceState[] | null> {
  const loaded = [...(await activeDevices()).values()];
  if (loaded.some((d) => d.suspended === null)) return null;
  return loaded.map((d) => ({ name: d.name, state: d.suspended ? "SUSPENDED" : "ACTIVE" }));
}

export async function checkSuspended(pool: string, timeoutMs: number): Promise<CheckResult> {
  let infos: DeviceState[];
  try {
    infos = (await sysfsStates().catch(() => null)) ?? (await infoAll({ timeoutMs, ctx: { pool_name: pool } }));
  } catch (e) {
    if (isDmError(e, "timeout")) return result(NAME, "block", `dmsetup info timed out after ${timeoutMs} ms`, RUNBOOK.poolStatusUnreadable);
    // no device-mapper, no dmsetup: pool.exists says so
    return result(NAME, "warn", `cannot read dmsetup info: ${errorMessage(e)}`, RUNBOOK.poolStatusUnreadable);
  }
  return judgeSuspended(pool, infos);
}
