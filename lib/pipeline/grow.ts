// Growing an activated snapshot's ext4 to its (larger) device: a microVM asks for its disk size.
// The snapshot's table is already the requested size (reads past the origin's end return zeros);
// e2fsck -f -p first (resize2fs refuses an unchecked filesystem), then resize2fs fills the device.
// Both are bounded; a failure is recorded by the caller and nothing is undone (fail dumb).
import { runTool, toolError } from "../dm/errors.ts";
import { assertDevPath } from "../dm/validate.ts";
import { ThinimgError } from "../errors.ts";
import { type CmdContext, run } from "../exec.ts";

export const FSCK_TIMEOUT_MS = 120_000;
export const RESIZE_TIMEOUT_MS = 300_000;

/** Sizes a snapshot may be given: at least the image's, whole 4K blocks, at most 16T. */
export function assertSnapshotSize(size: number, imageSize: number, image: string): number {
  if (!Number.isSafeInteger(size) || size % 4096 !== 0 || size > 16 * 1024 ** 4) {
    throw new ThinimgError("input", `size ${size} is not a whole number of 4K blocks up to 16T`, { hint: 'use e.g. "20G"' });
  }
  if (size < imageSize) {
    throw new ThinimgError("input", `size ${size} is below image ${image}'s own size ${imageSize}`, {
      hint: `ask for at least ${imageSize} bytes (${imageSize / 1024 ** 2}M), or none to get the image's size`,
    });
  }
  return size;
}

export async function growExt4(dev: string, o: { ctx?: CmdContext } = {}): Promise<void> {
  assertDevPath(dev);
  // exit 0: clean; 1: errors corrected (a snapshot of a cleanly unmounted layer has none, but the
  // journal-less fsck of a fresh snapshot may fix counters); anything else stops here
  const r = await run(["e2fsck", "-f", "-p", dev], { timeoutMs: FSCK_TIMEOUT_MS, ctx: o.ctx });
  if (r.timedOut || r.exitCode === null || r.exitCode > 1)
    throw toolError(r, "the snapshot is left active and recorded; release it and `bun scripts/gc.ts` removes it");
  await runTool(["resize2fs", dev], { timeoutMs: RESIZE_TIMEOUT_MS, ctx: o.ctx });
}
