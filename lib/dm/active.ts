// Which dm devices are loaded right now, read from sysfs (/sys/block/dm-N/dm/name): no command is
// spawned, which matters on hot paths (each dmsetup exec costs more than the check itself).
import { readdirSync, readFileSync } from "node:fs";
import * as dmsetup from "./dmsetup.ts";

export interface LoadedDevice {
  name: string;
  major: number;
  minor: number;
  /** /sys/block/dm-N/dm/suspended; null where it could not be read (no sysfs: `dmsetup ls`). */
  suspended: boolean | null;
}

/** Active dm devices by name, read from sysfs (/sys/block/dm-N/dm/name): no command is spawned,
 * which matters on the hot path (each dmsetup exec costs more than the check itself). Falls back to
 * `dmsetup ls` where sysfs is not mounted. */
export async function activeDevices(): Promise<Map<string, LoadedDevice>> {
  const out = new Map<string, LoadedDevice>();
  let entries: string[];
  try {
    entries = readdirSync("/sys/block").filter((e) => e.startsWith("dm-"));
  } catch {
    for (const d of await dmsetup.ls()) out.set(d.name, { ...d, suspended: null });
    return out;
  }
  for (const e of entries) {
    try {
      const name = readFileSync(`/sys/block/${e}/dm/name`, "utf8").trim();
      const [major, minor] = readFileSync(`/sys/block/${e}/dev`, "utf8").trim().split(":").map(Number);
      out.set(name, { name, major: major!, minor: minor!, suspended: suspendedFlag(e) });
    } catch {
      // removed while we looked
    }
  }
  return out;
}

function suspendedFlag(entry: string): boolean | null {
  try {
    return readFileSync(`/sys/block/${entry}/dm/suspended`, "utf8").trim() === "1";
  } catch {
    return null;
  }
}

/** The device if it is active, else null (see activeDevices). */
export async function activeDevice(name: string): Promise<LoadedDevice | null> {
  return (await activeDevices()).get(name) ?? null;
}
