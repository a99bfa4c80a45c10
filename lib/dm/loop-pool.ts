// A thin pool over two loop-backed files (metadata, data) — the layout recover-pool creates and
// the tests use. Files are allocated with fallocate; only where the filesystem does not support it
// (hostfs in the test VM, some NFS) are they made sparse with truncate. Any other fallocate failure
// (no space, quota, I/O error) stops: a sparse file on a full disk would fail later, under the pool.
import { closeSync, existsSync, ftruncateSync, openSync, statfsSync, statSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { fromErrno, ThinimgError } from "../errors.ts";
import { type CmdResult, run } from "../exec.ts";
import { formatBytes } from "../util/units.ts";
import * as dmsetup from "./dmsetup.ts";
import { classifyDmError, DmError } from "./errors.ts";
import * as losetup from "./losetup.ts";
import { poolTable, SECTOR } from "./pool.ts";
import { assertDmName } from "./validate.ts";

export interface LoopPoolSpec {
  dir: string;
  name: string;
  dataSize: number;
  metaSize: number;
  /** Bytes; default 64 KiB. */
  blockSize?: number;
  features?: string[];
}

export interface LoopPool {
  name: string;
  dir: string;
  metaFile: string;
  dataFile: string;
  metaDev: string;
  dataDev: string;
  blockSectors: number;
  dataSectors: number;
  lowWaterMark: number;
  features: string[];
}

export const META_FILE = "metadata.img";
export const DATA_FILE = "data.img";
export const DEFAULT_FEATURES = ["error_if_no_space"];

const FALLOCATE_TIMEOUT_MS = 60_000;
const NO_SPACE_HINT = "free space on that filesystem (or choose another --dir / smaller sizes) and re-run";

/** Bytes an unprivileged writer may still use on the filesystem holding `path` (df's "Avail");
 * null when the filesystem does not say. */
export function freeBytes(path: string): number | null {
  try {
    const s = statfsSync(path);
    return Number(s.bavail) * Number(s.bsize);
  } catch {
    return null;
  }
}

/** Refuse up front when the filesystem holding `dir` has less than `bytes` free. */
export function assertFreeSpace(dir: string, bytes: number, what: string): void {
  const free = freeBytes(dir);
  if (free === null || free >= bytes) return;
  throw new DmError(
    "no_space",
    {
      argv: [dir],
      stdout: "",
      stderr: `not enough space: ${formatBytes(bytes)} needed for ${what}, ${formatBytes(free)} free`,
      exitCode: null,
      signal: null,
      timedOut: false,
      durationMs: 0,
    },
    NO_SPACE_HINT,
  );
}

/** fallocate's answer when the filesystem cannot preallocate at all. */
export function fallocateUnsupported(r: CmdResult): boolean {
  return r.exitCode !== 0 && !r.timedOut && /Operation not supported|EOPNOTSUPP/i.test(r.stderr);
}

/** Give the file at `path` (new, or existing and empty) `size` bytes: fallocate, or truncate only
 * where fallocate is not supported. */
export async function allocateBackingFile(path: string, size: number): Promise<"fallocate" | "truncate"> {
  const r = await run(["fallocate", "-l", String(size), path], { timeoutMs: FALLOCATE_TIMEOUT_MS, probe: true });
  if (r.exitCode === 0 && !r.timedOut) return "fallocate";
  if (!fallocateUnsupported(r)) {
    const kind = classifyDmError(r);
    throw new DmError(
      kind,
      r,
      kind === "no_space"
        ? NO_SPACE_HINT
        : kind === "missing"
          ? "install util-linux (fallocate)"
          : `check the filesystem holding ${dirname(path)}; nothing else was changed`,
    );
  }
  try {
    const fd = openSync(path, existsSync(path) ? "r+" : "wx");
    try {
      ftruncateSync(fd, size);
    } finally {
      closeSync(fd);
    }
  } catch (e) {
    throw fromErrno(e, path) ?? e;
  }
  return "truncate";
}

/** Size a new backing file; never touches an existing one. */
export async function makeBackingFile(path: string, size: number): Promise<"fallocate" | "truncate"> {
  if (existsSync(path)) throw new ThinimgError("conflict", `${path} already exists`, { hint: "refusing to overwrite a backing file" });
  assertFreeSpace(dirname(path), size, basename(path));
  return allocateBackingFile(path, size);
}

/** Size an empty backing file (left by an interrupted create); refuses a file that holds data. */
export async function sizeEmptyBackingFile(path: string, size: number): Promise<"fallocate" | "truncate"> {
  if (statSync(path).size !== 0) throw new ThinimgError("conflict", `${path} is not empty`, { hint: "refusing to resize a backing file" });
  assertFreeSpace(dirname(path), size, basename(path));
  return allocateBackingFile(path, size);
}

/**
 * Extend an existing backing file to `size` bytes — never shrinks: a file already that large is left
 * alone ("unchanged"). fallocate, or truncate only where fallocate is not supported, like a new file.
 */
export async function extendBackingFile(path: string, size: number): Promise<"fallocate" | "truncate" | "unchanged"> {
  const cur = statSync(path).size;
  if (cur >= size) return "unchanged";
  assertFreeSpace(dirname(path), size - cur, `growing ${basename(path)}`);
  return allocateBackingFile(path, size);
}

export function lowWaterMarkFor(dataBlocks: number): number {
  // event when < 10 % free (at least one block): lets dmeventd-style watchers react early
  return Math.max(1, Math.floor(dataBlocks / 10));
}

/** Create files, attach loops, load the pool table. Fail dumb: nothing is undone on error. */
export async function createLoopPool(spec: LoopPoolSpec): Promise<LoopPool> {
  assertDmName(spec.name, "pool name");
  const blockSize = spec.blockSize ?? 64 * 1024;
  const blockSectors = blockSize / SECTOR;
  const dataSectors = Math.floor(spec.dataSize / blockSize) * blockSectors;
  const metaFile = join(spec.dir, META_FILE);
  const dataFile = join(spec.dir, DATA_FILE);
  assertFreeSpace(spec.dir, spec.metaSize + spec.dataSize, `${META_FILE} and ${DATA_FILE}`);
  await makeBackingFile(metaFile, spec.metaSize);
  await makeBackingFile(dataFile, spec.dataSize);
  const metaDev = await losetup.attach(metaFile, { ctx: { pool_name: spec.name } });
  const dataDev = await losetup.attach(dataFile, { ctx: { pool_name: spec.name } });
  const features = spec.features ?? DEFAULT_FEATURES;
  const lowWaterMark = lowWaterMarkFor(dataSectors / blockSectors);
  await dmsetup.create(spec.name, poolTable({ metaDev, dataDev, dataSectors, blockSectors, lowWaterMark, features }), {
    ctx: { pool_name: spec.name },
  });
  return { name: spec.name, dir: spec.dir, metaFile, dataFile, metaDev, dataDev, blockSectors, dataSectors, lowWaterMark, features };
}
