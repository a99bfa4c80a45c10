// A thin pool over two loop-backed files (metadata, data) — the layout recover-pool creates and
// the tests use. Files are created sparse: fallocate where the filesystem has it, else truncate
// (hostfs in the test VM has no fallocate).
import { closeSync, existsSync, ftruncateSync, openSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { run } from "../exec.ts";
import * as dmsetup from "./dmsetup.ts";
import * as losetup from "./losetup.ts";
import { SECTOR, poolTable } from "./pool.ts";
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

/** Size a new backing file; never touches an existing one. */
export async function makeBackingFile(path: string, size: number): Promise<"fallocate" | "truncate"> {
  if (existsSync(path)) throw new ThinimgError("conflict", `${path} already exists`, { hint: "refusing to overwrite a backing file" });
  const r = await run(["fallocate", "-l", String(size), path], { timeoutMs: 60_000, probe: true });
  if (r.exitCode === 0) return "fallocate";
  // fallocate unsupported (hostfs, some NFS): a sparse file via truncate
  const fd = openSync(path, existsSync(path) ? "r+" : "wx");
  try {
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
  return "truncate";
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
