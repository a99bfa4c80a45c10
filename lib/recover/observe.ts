// What recover-pool looks at before it decides: which loop devices really back a file (by inode, so
// a renamed or replaced file is never mistaken for the pool's), whether a metadata device was ever
// written, the line of a thin tool's output that says what is wrong, and how long those tools may take.
import { closeSync, openSync, readSync, realpathSync, statSync } from "node:fs";
import type { LoopDetail } from "../dm/losetup.ts";

/** "major:minor" of the filesystem a file lives on (st_dev), as losetup prints BACK-MAJ:MIN. */
export function devString(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

export interface FileId {
  path: string;
  real: string;
  ino: number;
  dev: string;
}

export function fileId(path: string): FileId | null {
  try {
    const st = statSync(path, { bigint: true });
    return { path, real: realpathSync(path), ino: Number(st.ino), dev: devString(st.dev) };
  } catch {
    return null;
  }
}

/** Loops backed by this very file. By inode when losetup reports it (survives renames and tells a
 * "(deleted)" name apart), else by path. */
export function loopsOf(loops: LoopDetail[], f: FileId | null): LoopDetail[] {
  if (!f) return [];
  return loops.filter((l) =>
    l.backingInode !== null && l.backingDev !== null
      ? l.backingInode === f.ino && l.backingDev === f.dev
      : !l.deleted && (l.backingFile === f.path || l.backingFile === f.real),
  );
}

/** The metadata superblock (first 4 KiB) is all zeros: a device no pool has ever written. */
export function superblockBlank(path: string): boolean {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return true; // not created yet (dry run of --create)
  }
  try {
    const buf = Buffer.alloc(4096);
    const n = readSync(fd, buf, 0, buf.length, 0);
    return buf.subarray(0, n).every((b) => b === 0);
  } finally {
    closeSync(fd);
  }
}

/** The line of thin_check/thin_repair output that says what is wrong (not "has not been fully examined"). */
export function toolReason(out: string): string {
  const lines = out
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean);
  return lines.find((l) => /corrupt|bad |checksum|error|fail|invalid|missing|needs to be provided/i.test(l)) ?? lines.at(-1) ?? "";
}

/** Scale tool timeouts with the metadata size: thin_check reads all of it (≥ 20 MB/s assumed). */
export function metaTimeoutMs(metaSize: number, factor = 1): number {
  return Math.max(120_000, Math.ceil(metaSize / (20 * 1024 ** 2)) * 1000) * factor;
}

export function sameFeatures(a: string[], b: string[]): boolean {
  return a.length === b.length && [...a].sort().join(" ") === [...b].sort().join(" ");
}
