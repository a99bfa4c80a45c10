// udev: when udevd runs, dmsetup syncs with it (nodes appear via rules); when it doesn't, dmsetup
// must not wait on a udev cookie that nobody will ever complete — so we disable udev support
// consistently for every call (libdevmapper then makes /dev/mapper nodes itself).
import { existsSync } from "node:fs";

let cached: boolean | undefined;

export function udevRunning(): boolean {
  if (process.env.DM_DISABLE_UDEV === "1") return false;
  cached ??= existsSync("/run/udev/control");
  return cached;
}

/** Extra dmsetup flags and env for the current udev situation. */
export function udevArgs(): { flags: string[]; env: Record<string, string> } {
  return udevRunning() ? { flags: [], env: {} } : { flags: ["--noudevsync"], env: { DM_DISABLE_UDEV: "1" } };
}
