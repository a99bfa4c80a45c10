// extractImage: SOURCE → a plain root directory (no devicemapper). resolve → for each layer, in
// order, its verified uncompressed stream → applyLayer into DEST.
// DEST must not exist or be empty. On failure what this run wrote is removed (DEST itself if we
// created it), so the one-line error is the whole outcome and a re-run starts clean; the blob
// cache keeps what was fetched, so the re-run does not download again.
import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, rmSync, type Stats } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { errorMessage, ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { byteString, fsPath, readDir } from "./apply/bytepath.ts";
import { type ApplyStats, DEFAULT_LIMITS, type Limits, warmFileReader } from "./apply/index.ts";
import { applyLayerRef } from "./apply-layer.ts";
import { integrityError, layerLabel } from "./format/layer.ts";
import { resolveImage } from "./resolve.ts";
import type { ImageConfig, ImageFormat, LayerRef, ResolvedImage } from "./types.ts";

/** What a progress display needs (lib/cli/progress.ts's ttyProgress() fits). */
export interface ProgressSink {
  stage(label: string): void;
  bytes(done: number, total: number | null): void;
  done(): void;
}

export interface ExtractOptions {
  stateDir: string;
  devices?: boolean;
  /** Per-layer limits for applyLayer; maxEntries and maxTotalBytes also bound the whole image. */
  limits?: Partial<Limits>;
  maxBlobBytes?: number;
  select?: string;
  platform?: string;
  signal?: AbortSignal;
  env?: Record<string, string | undefined>;
  progress?: ProgressSink;
}

/** The summary as `extract --json` prints it: snake_case keys, like every command's output. */
export function summaryJson(s: ExtractSummary) {
  const c = s.config;
  return {
    source: s.source,
    dest: s.dest,
    format: s.format,
    name: s.name,
    id: s.id,
    platform: s.platform,
    layers: s.layers.map((l) => ({
      digest: l.digest,
      diff_id: l.diffId,
      compression: l.compression,
      size: l.size,
      entries: l.entries,
      bytes: l.bytes,
      whiteouts: l.whiteouts,
      skipped: l.skipped,
      seconds: l.seconds,
    })),
    entries: s.entries,
    bytes: s.bytes,
    whiteouts: s.whiteouts,
    skipped: s.skipped,
    seconds: s.seconds,
    config: c && {
      digest: c.digest,
      architecture: c.architecture,
      os: c.os,
      variant: c.variant,
      env: c.env,
      entrypoint: c.entrypoint,
      cmd: c.cmd,
      working_dir: c.workingDir,
      user: c.user,
      labels: c.labels,
      diff_ids: c.diffIds,
    },
  };
}

export interface ExtractSummary {
  source: string;
  dest: string;
  format: ImageFormat;
  name: string | null;
  id: string | null;
  platform: string | null;
  layers: {
    digest: string;
    diffId: string | null;
    compression: string;
    size: number;
    entries: number;
    bytes: number;
    whiteouts: number;
    /** Device nodes and FIFOs not created (no `devices`, or not root). */
    skipped: number;
    seconds: number;
  }[];
  entries: number;
  bytes: number;
  whiteouts: number;
  skipped: number;
  seconds: number;
  config: ImageConfig | null;
}

/** DEST must be absent (created after the image resolves) or an empty directory. */
function checkDest(dest: string): { created: boolean; mode: number } {
  let st: Stats;
  try {
    st = lstatSync(dest);
  } catch {
    return { created: true, mode: 0o755 };
  }
  if (!st.isDirectory()) {
    throw new ThinimgError("conflict", `${dest} exists and is not a directory`, { hint: "choose a new DEST or an empty directory" });
  }
  if (readdirSync(dest).length > 0) {
    throw new ThinimgError("conflict", `${dest} is not empty`, { hint: "choose a new DEST or empty it first" });
  }
  return { created: false, mode: st.mode & 0o7777 };
}

export async function extractImage(source: string, destArg: string, o: ExtractOptions): Promise<ExtractSummary> {
  const t0 = performance.now();
  const dest = resolve(destArg);
  const { created, mode } = checkDest(dest);
  const limits: Limits = { ...DEFAULT_LIMITS, ...(o.limits ?? {}) };

  const image = await fetchImage(source, o, limits);

  if (created) createDest(dest);
  const summary: ExtractSummary = {
    source: image.source,
    dest,
    format: image.format,
    name: image.name,
    id: image.id,
    platform: image.platform,
    layers: [],
    entries: 0,
    bytes: 0,
    whiteouts: 0,
    skipped: 0,
    seconds: 0,
    config: image.config,
  };
  try {
    const total = image.layers.length;
    let holes = 0; // sparse files' holes so far: the byte budget counts apparent sizes
    for (const layer of image.layers) {
      const label = layerLabel(layer.index, total, layer.label);
      const lt0 = performance.now();
      o.progress?.stage(`layer ${label}`);
      // The image as a whole gets the same entry and byte budget as one layer, so many modest
      // layers cannot add up to a disk-filling image: each layer gets what earlier ones left.
      const left = { entries: limits.maxEntries - summary.entries, bytes: limits.maxTotalBytes - summary.bytes - holes };
      if (left.entries <= 0 || left.bytes <= 0) throw budgetError(label, limits, left, left.entries <= 0 ? "maxEntries" : "maxTotalBytes");
      const stats = await applyOne(layer, dest, label, o, limits, left, summary.entries > 0, summary.bytes + holes > 0);
      summary.layers.push({
        digest: layer.digest,
        diffId: layer.diffId,
        compression: layer.compression,
        size: layer.size,
        entries: stats.entries,
        bytes: stats.bytes,
        whiteouts: stats.whiteouts,
        skipped: stats.skipped,
        seconds: round((performance.now() - lt0) / 1000),
      });
      summary.entries += stats.entries;
      summary.bytes += stats.bytes;
      holes += stats.holes;
      summary.whiteouts += stats.whiteouts;
      summary.skipped += stats.skipped;
    }
  } catch (e) {
    o.progress?.done();
    removePartial(dest, created, mode);
    throw e;
  }
  o.progress?.done();
  if (summary.skipped > 0) {
    const why = o.devices !== true ? "pass --devices (as root) to create them" : "not running as root: FIFOs are created only as root";
    log.warn(`${summary.skipped} device node(s)/FIFO(s) skipped — ${why}`);
  }
  summary.seconds = round((performance.now() - t0) / 1000);
  return summary;
}

/** Resolve `source` into an image with at least one layer. */
async function fetchImage(source: string, o: ExtractOptions, limits: Limits): Promise<ResolvedImage> {
  o.progress?.stage(`fetch ${source}`);
  // A local source may hold plain tars, read by a reader thread: let it boot while resolving.
  if (existsSync(source)) warmFileReader();
  const image = await resolveImage(source, {
    stateDir: o.stateDir,
    lazyLocalDigests: true,
    maxLayerBytes: limits.maxTotalBytes,
    ...(o.maxBlobBytes ? { maxBlobBytes: o.maxBlobBytes } : {}),
    ...(o.select ? { select: o.select } : {}),
    ...(o.platform ? { platform: o.platform } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
    ...(o.env ? { env: o.env } : {}),
    onProgress: (p) => o.progress?.bytes(p.bytes, p.total),
  });
  if (image.layers.length === 0) throw new ThinimgError("input", `${source}: the image has no layers`);
  log.debug(`${source}: ${image.format}, ${image.layers.length} layers${image.name ? `, ${image.name}` : ""}`);
  return image;
}

/**
 * Apply one layer within what earlier layers `left` of the image's budget; `hadEntries` /
 * `hadBytes`: earlier layers used some of it. Errors name the real cause (integrity, image total).
 */
async function applyOne(
  layer: LayerRef,
  dest: string,
  label: string,
  o: ExtractOptions,
  limits: Limits,
  left: { entries: number; bytes: number },
  hadEntries: boolean,
  hadBytes: boolean,
): Promise<ApplyStats> {
  try {
    const applyOpts = {
      devices: o.devices === true,
      limits: { ...limits, maxEntries: left.entries, maxTotalBytes: left.bytes },
      layerLabel: label,
      onProgress: (b: number) => o.progress?.bytes(b, layer.compression === "none" ? layer.size : null),
    };
    return await applyLayerRef(layer, dest, { ...applyOpts, maxBytes: left.bytes });
  } catch (e) {
    // A damaged blob usually breaks the tar before its digest can be checked at EOF: when the
    // layer fails verification, that is the error to report, not the tar parser's symptom.
    if (e instanceof ThinimgError && e.kind === "input") throw (await integrityError(layer)) ?? e;
    // A budget cut short by earlier layers: say it is the image total that is over.
    if (e instanceof ThinimgError && e.kind === "policy") {
      if (hadEntries && /\(maxEntries\)/.test(e.message)) throw budgetError(label, limits, left, "maxEntries");
      if (hadBytes && /\(maxTotalBytes\)|decompressed size exceeds/.test(e.message)) {
        throw budgetError(label, limits, left, "maxTotalBytes");
      }
    }
    throw e;
  }
}

function budgetError(label: string, limits: Limits, left: { entries: number; bytes: number }, rule: "maxEntries" | "maxTotalBytes"): ThinimgError {
  const msg =
    rule === "maxEntries"
      ? `image total exceeds the limit of ${limits.maxEntries} entries (maxEntries; ${Math.max(0, left.entries)} left after earlier layers)`
      : `image total exceeds the limit of ${limits.maxTotalBytes} bytes (maxTotalBytes; ${Math.max(0, left.bytes)} left after earlier layers)`;
  return new ThinimgError("policy", `layer ${label}: ${msg}`, {
    hint: `raise ${rule === "maxEntries" ? "--max-entries / THINIMG_MAX_ENTRIES" : "--max-bytes / THINIMG_MAX_LAYER_SIZE"} if the image is legitimate`,
    details: { layer: label, rule },
  });
}

/**
 * Create DEST (absent when checked, before the image resolved). Its parents may be created; DEST
 * itself is created exclusively, so one that appeared meanwhile is never used (nor removed later).
 */
function createDest(dest: string): void {
  try {
    mkdirSync(dirname(dest), { recursive: true, mode: 0o755 });
    mkdirSync(dest, 0o755);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "EEXIST") {
      throw new ThinimgError("conflict", `${dest} appeared while the image was being fetched`, {
        hint: "another process is using DEST; choose a new DEST",
      });
    }
    throw new ThinimgError("input", `cannot create ${dest}: ${errorMessage(e)}`, { hint: "check the parent directory and permissions" });
  }
}

const round = (s: number) => Math.round(s * 1000) / 1000;

/**
 * Remove what a failed extraction wrote. Never follows symlinks (rmSync lstat's); directories an
 * image made read-only are opened up first so an unprivileged run can clean up too.
 */
function removePartial(dest: string, created: boolean, mode: number): void {
  // dir: a byte string (names that are not UTF-8 are opened up too)
  const openUp = (dir: string) => {
    try {
      chmodSync(fsPath(dir), 0o700);
      for (const d of readDir(dir)) if (d.dir) openUp(`${dir}/${d.name}`);
    } catch {
      // best effort; rmSync reports what is left
    }
  };
  try {
    openUp(byteString(dest));
    if (created) rmSync(dest, { recursive: true, force: true });
    else {
      for (const name of readdirSync(dest)) rmSync(join(dest, name), { recursive: true, force: true });
      chmodSync(dest, mode);
    }
  } catch (e) {
    log.warn(`could not remove the partial extraction in ${dest}: ${errorMessage(e)}; remove it before re-running`);
  }
}
