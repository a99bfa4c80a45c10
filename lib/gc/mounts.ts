// Which of our devices are mounted, and whether each mount is thinimg's own (made under the state
// dir's mount dir, where the pipeline applies layers) — only those may be unmounted by GC. Any other
// mount of an orphan (a user's, a VM's) makes GC skip the device.
import { type MountEntry, mountinfo } from "../dm/mount.ts";
import type { DmDevice, MountRef } from "./model.ts";

function under(dir: string, path: string): boolean {
  const d = dir.endsWith("/") ? dir : `${dir}/`;
  return path.startsWith(d);
}

/** device name → its mounts (in this mount namespace), by major:minor and by /dev/mapper source. */
export function mountsByDevice(
  devices: Pick<DmDevice, "name" | "major" | "minor">[],
  entries: MountEntry[],
  ourMountDir: string,
  recordedPaths: Iterable<string> = [],
): Map<string, MountRef[]> {
  const recorded = new Set(recordedPaths);
  const byMM = new Map<string, MountEntry[]>();
  for (const e of entries) {
    const l = byMM.get(e.majorMinor);
    if (l) l.push(e);
    else byMM.set(e.majorMinor, [e]);
  }
  const res = new Map<string, MountRef[]>();
  for (const d of devices) {
    const mm = `${d.major}:${d.minor}`;
    const found = new Map<string, MountEntry>();
    for (const e of byMM.get(mm) ?? []) found.set(e.mountPoint, e);
    // a source of /dev/mapper/<name> with another major:minor can't be this device; but some
    // filesystems report a synthetic st_dev (btrfs): match the source too
    for (const e of entries) if (e.source === `/dev/mapper/${d.name}`) found.set(e.mountPoint, e);
    if (found.size === 0) continue;
    res.set(
      d.name,
      [...found.values()].map((e) => ({
        mountPoint: e.mountPoint,
        majorMinor: e.majorMinor,
        source: e.source,
        // ours: in our mount dir and a plain mount of the device root (a bind of a subdir is someone's)
        ours: (under(ourMountDir, e.mountPoint) || recorded.has(e.mountPoint)) && e.root === "/",
      })),
    );
  }
  return res;
}

export function readMountinfo(): MountEntry[] {
  return mountinfo();
}
