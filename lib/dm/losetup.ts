// Loop devices backing file-based pools.
import { readFileSync, realpathSync } from "node:fs";
import { ThinimgError } from "../errors.ts";
import type { CmdContext } from "../exec.ts";
import { runTool } from "./errors.ts";
import { assertDevPath } from "./validate.ts";

export interface LoopDevice {
  device: string;
  backingFile: string;
  readOnly: boolean;
}

const LOSETUP_TIMEOUT_MS = 15_000;

export function parseLosetupJson(out: string): LoopDevice[] {
  if (!out.trim()) return [];
  const j = JSON.parse(out) as { loopdevices?: { name: string; "back-file": string | null; ro: boolean | string }[] };
  return (j.loopdevices ?? []).map((d) => ({
    device: d.name,
    backingFile: (d["back-file"] ?? "").replace(/ \(deleted\)$/, ""),
    readOnly: d.ro === true || d.ro === "1",
  }));
}

export async function list(ctx?: CmdContext): Promise<LoopDevice[]> {
  const r = await runTool(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,RO"], {
    timeoutMs: LOSETUP_TIMEOUT_MS,
    ctx,
  });
  return parseLosetupJson(r.stdout);
}

function canonical(file: string): string {
  try {
    return realpathSync(file);
  } catch {
    return file;
  }
}

export async function findByFile(file: string, ctx?: CmdContext): Promise<string | null> {
  const want = canonical(file);
  const found = (await list(ctx)).find((d) => d.backingFile === want || canonical(d.backingFile) === want);
  return found?.device ?? null;
}

export async function attach(file: string, o: { readOnly?: boolean; ctx?: CmdContext } = {}): Promise<string> {
  assertDevPath(file);
  const r = await runTool(["losetup", "--find", "--show", ...(o.readOnly ? ["--read-only"] : []), file], {
    timeoutMs: LOSETUP_TIMEOUT_MS,
    ctx: o.ctx,
  });
  const dev = r.stdout.trim();
  if (!/^\/dev\/loop\d+$/.test(dev)) throw new ThinimgError("dm", `losetup gave no device for ${file}: "${dev}"`);
  return dev;
}

/** `losetup --set-capacity`: the loop re-reads its backing file's size (after the file was extended). */
export async function refreshCapacity(dev: string, ctx?: CmdContext): Promise<void> {
  assertDevPath(dev);
  await runTool(["losetup", "--set-capacity", dev], { timeoutMs: LOSETUP_TIMEOUT_MS, ctx });
}

/** Size in bytes the kernel sees for a block device "MAJ:MIN" (sysfs; 512-byte sectors), or null. */
export function blockDeviceBytes(majMin: string): number | null {
  try {
    const sectors = Number(readFileSync(`/sys/dev/block/${majMin}/size`, "utf8").trim());
    return Number.isFinite(sectors) ? sectors * 512 : null;
  } catch {
    return null;
  }
}

export async function detach(dev: string, ctx?: CmdContext): Promise<void> {
  assertDevPath(dev);
  await runTool(["losetup", "--detach", dev], { timeoutMs: LOSETUP_TIMEOUT_MS, ctx });
}

/** A loop device with what it takes to match it to a file even after renames: the backing inode
 * and filesystem device, and the loop's own major:minor (dm tables name devices that way). */
export interface LoopDetail extends LoopDevice {
  /** "7:0" */
  majMin: string;
  backingInode: number | null;
  /** "254:0": the filesystem the backing file lives on. */
  backingDev: string | null;
  /** The backing file's name was unlinked or replaced since attach ("… (deleted)"). */
  deleted: boolean;
}

export function parseLosetupDetailJson(out: string): LoopDetail[] {
  if (!out.trim()) return [];
  const j = JSON.parse(out) as {
    loopdevices?: {
      name: string;
      "back-file": string | null;
      ro: boolean | string;
      "maj:min"?: string;
      "back-ino"?: number | string | null;
      "back-maj:min"?: string | null;
    }[];
  };
  return (j.loopdevices ?? []).map((d) => {
    const raw = d["back-file"] ?? "";
    const ino = d["back-ino"];
    return {
      device: d.name,
      backingFile: raw.replace(/ \(deleted\)$/, ""),
      readOnly: d.ro === true || d.ro === "1",
      majMin: (d["maj:min"] ?? "").trim(),
      backingInode: ino === null || ino === undefined || ino === "" ? null : Number(ino),
      backingDev: d["back-maj:min"]?.trim() || null,
      deleted: / \(deleted\)$/.test(raw),
    };
  });
}

export async function listDetailed(ctx?: CmdContext): Promise<LoopDetail[]> {
  const r = await runTool(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,RO,MAJ:MIN,BACK-INO,BACK-MAJ:MIN"], {
    timeoutMs: LOSETUP_TIMEOUT_MS,
    ctx,
  });
  return parseLosetupDetailJson(r.stdout);
}
