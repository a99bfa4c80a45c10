// Which dm devices are loaded right now, read from sysfs (/sys/block/dm-N/dm/name): no command is
// spawned, which matters on hot paths (each dmsetup exec costs more than the check itself).
import { closeSync, openSync, readdirSync, readFileSync } from "node:fs";
import { ioctlErrno } from "../util/libc.ts";
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

/** Only the names of the active dm devices: one sysfs read per device instead of activeDevices'
 * three, for callers that only ask whether a device is loaded (list, re-attach). */
export async function activeDeviceNames(): Promise<Set<string>> {
  let entries: string[];
  try {
    entries = readdirSync("/sys/block").filter((e) => e.startsWith("dm-"));
  } catch {
    return new Set((await dmsetup.ls()).map((d) => d.name));
  }
  const out = new Set<string>();
  for (const e of entries) {
    try {
      out.add(readFileSync(`/sys/block/${e}/dm/name`, "utf8").trim());
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

// DM_DEV_STATUS on /dev/mapper/control (linux/dm-ioctl.h): the kernel's own answer for one name, the
// same ioctl `dmsetup info NAME` makes, in one syscall that never waits on the device.
const DM_IOCTL_SIZE = 312; // sizeof(struct dm_ioctl)
const DM_NAME_OFFSET = 48;
const DM_NAME_LEN = 128;
const DM_DEV_STATUS = 0xc138fd07; // _IOWR(0xfd, DM_DEV_STATUS_CMD = 7, struct dm_ioctl)
const DM_SUSPEND_FLAG = 1 << 1;
const ENXIO = 6;

/** One device's status from the kernel: the device, null when no device has that name, undefined
 * when the ioctl cannot be used here (no control node, not permitted). */
export function devStatusIoctl(name: string, control = "/dev/mapper/control"): LoadedDevice | null | undefined {
  const nameBytes = Buffer.from(name, "utf8");
  if (nameBytes.length >= DM_NAME_LEN || nameBytes.includes(0)) return undefined;
  let fd: number;
  try {
    fd = openSync(control, "r");
  } catch {
    return undefined;
  }
  try {
    const buf = new Uint8Array(DM_IOCTL_SIZE);
    const v = new DataView(buf.buffer);
    v.setUint32(0, 4, true); // interface version 4.0.0
    v.setUint32(12, DM_IOCTL_SIZE, true); // data_size
    v.setUint32(16, DM_IOCTL_SIZE, true); // data_start
    buf.set(nameBytes, DM_NAME_OFFSET);
    const err = ioctlErrno(fd, DM_DEV_STATUS, buf);
    if (err === ENXIO) return null;
    if (err !== 0) return undefined;
    const dev = Number(v.getBigUint64(40, true)); // huge_encode_dev: new_encode_dev for 32-bit dev_t
    const major = (dev & 0xfff00) >>> 8;
    const minor = (dev & 0xff) | ((dev >>> 12) & 0xfff00);
    return { name, major, minor, suspended: (v.getUint32(28, true) & DM_SUSPEND_FLAG) !== 0 };
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** The device if it is active, else null. One ioctl for that name where the control node allows
 * it (a hot-path check must not grow with the devices on the host), else the scan above. */
export async function activeDevice(name: string): Promise<LoadedDevice | null> {
  const one = devStatusIoctl(name);
  if (one !== undefined) return one;
  return (await activeDevices()).get(name) ?? null;
}
