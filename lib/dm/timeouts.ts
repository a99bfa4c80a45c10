// Per-tool command timeouts. The defaults suit real hosts; THINIMG_TIMEOUT_MKFS, _MOUNT and _UMOUNT
// (durations, e.g. 2s or 5m) override one: a very large device may need a longer mkfs, and the fault
// tests use short ones to make a hung command time out quickly.
import { parseDuration } from "../util/units.ts";

export type TimedTool = "mkfs" | "mount" | "umount";

export function toolTimeout(tool: TimedTool, dfltMs: number): number {
  const name = `THINIMG_TIMEOUT_${tool.toUpperCase()}`;
  const raw = process.env[name];
  return raw ? parseDuration(raw, name) : dfltMs;
}
