// Per-tool command timeouts. The defaults suit real hosts; THINIMG_TIMEOUT_MKFS, _MOUNT and _UMOUNT
// (durations, e.g. 2s or 5m) override one: a very large device may need a longer mkfs, and the fault
// tests use short ones to make a hung command time out quickly.
import { envDuration } from "../config.ts";

export type TimedTool = "mkfs" | "mount" | "umount";

export function toolTimeout(tool: TimedTool, dfltMs: number): number {
  return envDuration(`THINIMG_TIMEOUT_${tool.toUpperCase() as Uppercase<TimedTool>}`, dfltMs);
}
