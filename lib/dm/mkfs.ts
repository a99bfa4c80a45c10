// ext4 for layer devices. No discard (the thin device is fresh; discards would only cost time),
// no lazy init (background init threads would keep writing after we unmount and commit).
import type { CmdContext } from "../exec.ts";
import { runTool } from "./errors.ts";
import { toolTimeout } from "./timeouts.ts";
import { assertDevPath } from "./validate.ts";

export const MKFS_EXT4_OPTS = "nodiscard,lazy_itable_init=0,lazy_journal_init=0";

export async function mkfsExt4(dev: string, o: { label?: string; timeoutMs?: number; ctx?: CmdContext } = {}) {
  assertDevPath(dev);
  const label = o.label ? ["-L", o.label.slice(0, 16)] : [];
  await runTool(["mkfs.ext4", "-q", "-F", "-E", MKFS_EXT4_OPTS, ...label, dev], {
    timeoutMs: o.timeoutMs ?? toolTimeout("mkfs", 120_000),
    ctx: o.ctx,
  });
}
