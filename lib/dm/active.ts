// Which dm devices are loaded right now, read from sysfs (/sys/block/dm-N/dm/name): no command is
// spawned, which matters on hot paths (each dmsetup exec costs more than the check itself).
import { readdirSync, readFileSync } from "node:fs";
import * as dmsetup from "./dmsetup.ts";

/** Active dm devices by name, read from sysfs (/sys/block/dm-N/dm/name): no command is spawned,
 * which matters on the hot path (each dmsetup exec costs more than the check itself). Falls back to
 * `dmsetup ls` where sysfs is not mounted. */
export async function activeDevices(): Promise<Map<string, { name: string; major: number; minor: number }>> {
  const out = new Map<string, { name: string; major: number; minor: number }>();
  let entries: string[];
  try {
    entries = readdirSync("/sys/block").filter((e) => e.startsWith("dm-"));
  } catch {
    for (const d of await dmsetup.ls()) out.set(d.name, d);
    return out;
  }
  for (const e of entries) {
    try {
      const name = readFileSync(`/sys/block/${e}/dm/name`, "utf8").trim();
      const [major, minor] = readFileSync(`/sys/block/${e}/dev`, "utf8").trim().split(":").map(Number);
      out.set(name, { name, major: major!, minor: minor! });
    } catch {
      // removed while we looked
    }
  }
  return out;
}

/** The device if it is active, else null (see activeDevices). */
export async function activeDevice(name: string): Promise<{ name: string; major: number; minor: number } | null> {
  return (await activeDevices()).get(name) ?? null;
}
