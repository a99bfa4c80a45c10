// mount/umount and /proc/self/mountinfo, so callers (GC, pipeline) know what is mounted where.
import { readFileSync } from "node:fs";
import type { CmdContext } from "../exec.ts";
import { runTool } from "./errors.ts";
import { toolTimeout } from "./timeouts.ts";
import { assertDevPath } from "./validate.ts";

export interface MountEntry {
  mountId: number;
  majorMinor: string;
  root: string;
  mountPoint: string;
  options: string;
  fstype: string;
  source: string;
  superOptions: string;
}

// mountinfo escapes space, tab, newline and backslash as \ooo
const unescapeOctal = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));

export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const l = left.split(" ");
    const r = right.split(" ");
    out.push({
      mountId: Number(l[0]),
      majorMinor: l[2] ?? "",
      root: unescapeOctal(l[3] ?? ""),
      mountPoint: unescapeOctal(l[4] ?? ""),
      options: l[5] ?? "",
      fstype: r[0] ?? "",
      source: unescapeOctal(r[1] ?? ""),
      superOptions: r[2] ?? "",
    });
  }
  return out;
}

export function mountinfo(path = "/proc/self/mountinfo"): MountEntry[] {
  return parseMountinfo(readFileSync(path, "utf8"));
}

/** Mounts whose source is `dev` or whose device number is `major:minor`. */
export function mountsOf(devOrMajorMinor: string, entries = mountinfo()): MountEntry[] {
  return entries.filter((e) => e.source === devOrMajorMinor || e.majorMinor === devOrMajorMinor);
}

export async function mount(
  dev: string,
  dir: string,
  o: { fstype?: string; options?: string[]; readOnly?: boolean; ctx?: CmdContext; timeoutMs?: number } = {},
): Promise<void> {
  assertDevPath(dev);
  assertDevPath(dir);
  const opts = [...(o.readOnly ? ["ro"] : []), ...(o.options ?? [])];
  await runTool(["mount", "-t", o.fstype ?? "ext4", ...(opts.length ? ["-o", opts.join(",")] : []), dev, dir], {
    timeoutMs: o.timeoutMs ?? toolTimeout("mount", 30_000),
    ctx: o.ctx,
  });
}

export async function umount(dir: string, o: { ctx?: CmdContext; timeoutMs?: number } = {}): Promise<void> {
  assertDevPath(dir);
  await runTool(["umount", dir], { timeoutMs: o.timeoutMs ?? toolTimeout("umount", 60_000), ctx: o.ctx });
}
