// Growing an activated snapshot's ext4 (lib/pipeline/grow.ts): which sizes are accepted, and the
// command sequence decided from e2fsck's exit codes (a fake runner; the VM test
// test/vm/service.test.ts grows a real filesystem and mounts it).
import { afterEach, describe, expect, test } from "bun:test";
import { type CmdResult, setRunner, spawnRunner } from "../../lib/exec.ts";
import { assertSnapshotSize, growExt4 } from "../../lib/pipeline/grow.ts";

afterEach(() => void setRunner(spawnRunner));

const MiB = 1024 ** 2;

function fake(codes: Record<string, number>): string[] {
  const ran: string[] = [];
  setRunner(async (argv): Promise<CmdResult> => {
    ran.push(argv.join(" "));
    return { argv, stdout: "", stderr: codes[argv[0]!] ? "trouble" : "", exitCode: codes[argv[0]!] ?? 0, signal: null, timedOut: false, durationMs: 1 };
  });
  return ran;
}

describe("snapshot sizes", () => {
  test("at least the image's size, whole 4K blocks, at most 16T", () => {
    expect(assertSnapshotSize(256 * MiB, 256 * MiB, "app")).toBe(256 * MiB);
    expect(assertSnapshotSize(20 * 1024 * MiB, 256 * MiB, "app")).toBe(20 * 1024 * MiB);
    expect(() => assertSnapshotSize(128 * MiB, 256 * MiB, "app")).toThrow(/below image app's own size/);
    expect(() => assertSnapshotSize(256 * MiB + 512, 256 * MiB, "app")).toThrow(/4K blocks/);
    expect(() => assertSnapshotSize(17 * 1024 ** 4, 256 * MiB, "app")).toThrow(/16T/);
  });
});

describe("growExt4", () => {
  test("e2fsck -f -p, then resize2fs; an fsck that corrected errors (exit 1) still grows", async () => {
    for (const code of [0, 1]) {
      const ran = fake({ e2fsck: code });
      await growExt4("/dev/mapper/thinimg-p-snap-3");
      expect(ran).toEqual(["e2fsck -f -p /dev/mapper/thinimg-p-snap-3", "resize2fs /dev/mapper/thinimg-p-snap-3"]);
    }
  });

  test("an fsck that left errors stops before resize2fs; a failed resize2fs is an error", async () => {
    const ran = fake({ e2fsck: 4 });
    await expect(growExt4("/dev/mapper/thinimg-p-snap-3")).rejects.toThrow(/e2fsck/);
    expect(ran).toEqual(["e2fsck -f -p /dev/mapper/thinimg-p-snap-3"]);
    fake({ resize2fs: 1 });
    await expect(growExt4("/dev/mapper/thinimg-p-snap-3")).rejects.toThrow(/resize2fs/);
  });

  test("a path that is not an absolute device path runs nothing", async () => {
    const ran = fake({});
    await expect(growExt4("/dev/mapper/../../etc/passwd")).rejects.toThrow(/invalid device path/);
    await expect(growExt4("snap-3")).rejects.toThrow(/invalid device path/);
    expect(ran).toEqual([]);
  });
});
