// Unpack: image → one committed thin device per layer chain. Layers already committed in this pool
// (by any image) are reused; only missing chains are built. A re-run of an unpacked image is a DB
// lookup: no resolve, no dm work.
import { basename } from "node:path";
import { ThinimgError } from "../errors.ts";
import type { LayerRef, ResolvedImage, ResolveOptions } from "../image/types.ts";
import { acquireNamedLock, withNamedLock } from "../lock/named-lock.ts";
import { log } from "../log.ts";
import type { Ctx } from "../pool/context.ts";
import { assertImageName } from "../pool/names.ts";
import { recordBlob } from "../store/blobs.ts";
import { tx } from "../store/db.ts";
import { beginImage, getImageByName, type ImageRow, imageLayerIds, markImageBuildFailed, markImageReady } from "../store/images.ts";
import { imageLockKey, layerLockKey, workSubject } from "../store/keys.ts";
import { anyLayerOfSize, getLayer, getLayerByChain, insertLayer, type LayerRow } from "../store/layers.ts";
import { finishWork, startWork, type WorkRow } from "../store/work.ts";
import { chainIdOf, identityOf, isProvisionalChainId, provisionalChainId } from "./chain.ts";
import { isPermanent } from "./failure.ts";
import type { BuildResult } from "./layer-build.ts";

export interface UnpackOptions {
  source: string;
  name?: string | undefined;
  /** Tag / ref.name inside a multi-image archive or layout. */
  select?: string | undefined;
  platform?: string | undefined;
  /** Resolve the source again even when an image of that name and source is ready. */
  refresh?: boolean | undefined;
  signal?: AbortSignal | undefined;
}

export interface UnpackedLayer {
  index: number;
  chain_id: string;
  thin_id: number;
  device_name: string;
  /** true: the device was already committed (shared with another image or an earlier run). */
  reused: boolean;
  /** What the layer's apply did (null: built by an older thinimg, or not recorded). */
  stats: { entries: number; bytes: number; whiteouts: number; skipped: number; holes: number; duration_ms: number } | null;
}

export interface UnpackResult {
  image: { id: number; name: string; source: string; format: string | null; state: string };
  layers: UnpackedLayer[];
  built: number;
  reused: number;
  /** false when nothing touched the pool (a re-run). */
  dm_work: boolean;
  /** We waited for another process that was unpacking the same image. */
  waited: boolean;
  duration_ms: number;
}

/** A layer's recorded apply stats (lib/image/apply ApplyStats, stored as JSON) in the output's style. */
function statsJson(raw: string | null): UnpackedLayer["stats"] {
  if (!raw) return null;
  const s = JSON.parse(raw) as Partial<{ entries: number; bytes: number; whiteouts: number; skipped: number; holes: number; durationMs: number }>;
  return {
    entries: s.entries ?? 0,
    bytes: s.bytes ?? 0,
    whiteouts: s.whiteouts ?? 0,
    skipped: s.skipped ?? 0,
    holes: s.holes ?? 0,
    duration_ms: s.durationMs ?? 0,
  };
}

/** Default image name: the source's last path component without archive suffixes. */
export function defaultImageName(source: string): string {
  const trimmed = source.replace(/\/+$/, "");
  const base = basename(trimmed.replace(/^[a-z0-9]+:\/\/[^/]*/i, "")) || "image";
  const n = base
    .replace(/\.(tar|tgz|tar\.gz|tar\.zst|oci)$/i, "")
    .replace(/[^A-Za-z0-9._:@+-]/g, "_")
    .replace(/^[^A-Za-z0-9]+/, "");
  return n || "image";
}

function resultFromDb(ctx: Ctx, img: ImageRow, t0: number, waited: boolean): UnpackResult {
  const layers = imageLayerIds(ctx.db, img.id).map((id, index) => {
    const l = getLayer(ctx.db, id)!;
    return { index, chain_id: l.chain_id, thin_id: l.thin_id!, device_name: l.device_name!, reused: true, stats: statsJson(l.stats) };
  });
  return {
    image: { id: img.id, name: img.name, source: img.source, format: img.format, state: img.state },
    layers,
    built: 0,
    reused: layers.length,
    dm_work: false,
    waited,
    duration_ms: Math.round(performance.now() - t0),
  };
}

/** A ready image of this name from this source: nothing to do. */
function readyImage(ctx: Ctx, name: string, source: string): ImageRow | null {
  const img = getImageByName(ctx.db, ctx.cfg.pool, name);
  return img && img.state === "ready" && img.source === source ? img : null;
}

/** How long a passed pre-flight check stands for the first dm command (each check spawns `dmsetup status`). */
const PREFLIGHT_FRESH_MS = 5_000;

export async function unpack(ctx: Ctx, o: UnpackOptions): Promise<UnpackResult> {
  const t0 = performance.now();
  const { db, cfg } = ctx;
  const name = assertImageName(o.name ?? defaultImageName(o.source));
  if (!o.refresh) {
    const img = readyImage(ctx, name, o.source);
    if (img) return resultFromDb(ctx, img, t0, false);
  }
  const lock = await acquireNamedLock(db, imageLockKey(cfg.pool, name), {
    waitMs: cfg.lockWaitMs,
    command: ctx.owner.command,
    what: `image ${name}`,
    onWait: () => ctx.progress?.stage(`waiting for image ${name}`),
  });
  try {
    if (lock.waited && !o.refresh) {
      // someone else was building it: reuse their result
      const img = readyImage(ctx, name, o.source);
      if (img) return resultFromDb(ctx, img, t0, true);
    }
    return await unpackLocked(ctx, name, o, t0, lock.waited);
  } finally {
    lock.release();
  }
}

/** How an unpack resolves (fetches into the blob cache) its source; a prefetch does the same ahead. */
export function resolveOptions(ctx: Ctx, o: UnpackOptions): ResolveOptions {
  const { cfg } = ctx;
  return {
    stateDir: cfg.stateDir,
    maxBlobBytes: cfg.limits.maxBlobBytes,
    maxLayerBytes: cfg.limits.maxLayerBytes,
    ...(o.select ? { select: o.select } : {}),
    ...(o.platform ? { platform: o.platform } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
    onProgress: (p) => ctx.progress?.bytes(p.bytes, p.total),
    lazyDigests: true,
  };
}

async function unpackLocked(ctx: Ctx, name: string, o: UnpackOptions, t0: number, waited: boolean): Promise<UnpackResult> {
  const { db, cfg } = ctx;
  // Loaded only when there is work: a re-run of a ready image never pays for the image/dm/health
  // modules (on the test VM's hostfs every module file costs a few ms to load).
  const [{ resolveImage }, { parseSource }, { buildLayer }, { preflight }] = await Promise.all([
    import("../image/resolve.ts"),
    import("../image/source/spec.ts"),
    import("./layer-build.ts"),
    import("./preflight.ts"),
  ]);
  // a SOURCE that cannot be one (no such file, a malformed URL or bucket) is the caller's mistake,
  // said before anything about the host
  parseSource(o.source, o.select);
  // fail fast: a missing or sick pool is reported before anything is resolved or downloaded; the
  // check runs again right before the first dm command when the resolve took long (a download)
  ctx.progress?.stage("health checks");
  await preflight(ctx);
  const checkedAt = performance.now();
  ctx.progress?.stage(`resolve ${o.source}`);
  const resolved: ResolvedImage = await resolveImage(o.source, resolveOptions(ctx, o));
  if (resolved.layers.length === 0) {
    throw new ThinimgError("input", `${o.source}: the image has no layers`, { hint: "check the source (a layer family needs 1.tar, 2.tar, …)" });
  }
  tx(db, () => {
    for (const l of resolved.layers) {
      if (!l.lazy || l.lazy.known()) recordBlob(db, { digest: l.digest, size: l.size, compression: l.compression, diffId: l.diffId });
    }
  });
  const img = beginImage(db, { pool: cfg.pool, name, source: o.source, format: resolved.format });
  const work = startWork(db, cfg.pool, "unpack", workSubject("image", img.id), ctx.owner);
  // a check that just passed still speaks for the host; after a long resolve (a download) it runs again
  const p: LayersProgress = { out: [], built: 0, healthy: performance.now() - checkedAt < PREFLIGHT_FRESH_MS };
  try {
    await buildLayers(ctx, resolved, p, buildLayer, preflight);
    markImageReady(db, img.id, {
      source: o.source,
      format: resolved.format,
      config: resolved.config,
      layerIds: p.out.map((l) => layerIdOf(ctx, l.chain_id)),
      topChainId: p.out.at(-1)?.chain_id ?? null,
    });
    finishWork(db, work.id, "done");
  } catch (e) {
    recordUnpackFailure(ctx, name, o, img, work, resolved, p, e);
    throw e;
  }
  const { out, built } = p;
  const final = getImageByName(db, cfg.pool, name)!;
  return {
    image: { id: final.id, name: final.name, source: final.source, format: final.format, state: final.state },
    layers: out,
    built,
    reused: out.length - built,
    dm_work: built > 0,
    waited,
    duration_ms: Math.round(performance.now() - t0),
  };
}

/** An unpack's progress through its layers, read by the failure path for the partial document. */
interface LayersProgress {
  out: UnpackedLayer[];
  built: number;
  /** a pre-flight check passed recently enough to speak for the host */
  healthy: boolean;
}

type BuildLayer = typeof import("./layer-build.ts")["buildLayer"];
type Preflight = typeof import("./preflight.ts")["preflight"];

/** Each layer in order: reused when its chain is committed, otherwise built under its layer lock. */
async function buildLayers(ctx: Ctx, resolved: ResolvedImage, p: LayersProgress, buildLayer: BuildLayer, preflight: Preflight): Promise<void> {
  const { db, cfg } = ctx;
  const out = p.out;
  let parent: LayerRow | null = null;
  for (const [i, ref] of resolved.layers.entries()) {
    const chainId = await chainFor(ctx, parent, ref);
    const label = `${i + 1}/${resolved.layers.length} (${ref.label})`;
    let row = getLayerByChain(db, cfg.pool, chainId);
    if (row?.state === "committed") {
      out.push(layerOut(i, row, true));
      parent = row;
      continue;
    }
    if (row?.state === "failed" && isPermanent(row.error_kind)) {
      throw new ThinimgError(row.error_kind === "policy" ? "policy" : "input", `layer ${label} failed earlier and would fail again: ${row.error}`, {
        hint: "fix the image; a re-run does no device work for it",
      });
    }
    if (!p.healthy) {
      ctx.progress?.stage("health checks");
      await preflight(ctx);
      p.healthy = true;
    }
    row ??= insertLayerOnce(ctx, chainId, parent, ref);
    const layerId = row.id;
    const parentRow: LayerRow | null = parent;
    const result: BuildResult = await withNamedLock(
      db,
      layerLockKey(cfg.pool, chainId),
      { waitMs: cfg.lockWaitMs, command: ctx.owner.command, what: `layer ${label}` },
      () => buildLayer(ctx, { layerId, parent: parentRow, ref, label }),
    );
    if (ref.lazy) {
      const l = result.layer;
      recordBlob(db, { digest: l.digest, size: l.size, compression: ref.compression, diffId: l.diff_id });
    }
    const reused = !result.built;
    if (!reused) p.built++;
    ctx.progress?.done(); // the log line must not land in the middle of the progress line
    log.info(
      `layer ${label}: ${reused ? "reused" : "built"} ${result.layer.device_name}${result.abandoned ? ` (${result.abandoned} interrupted attempt(s) left for GC)` : ""}`,
    );
    out.push(layerOut(i, result.layer, reused));
    parent = result.layer;
  }
}

/** Records a failed unpack (image and work rows) and gives its error the partial document. */
function recordUnpackFailure(
  ctx: Ctx,
  name: string,
  o: UnpackOptions,
  img: ImageRow,
  work: WorkRow,
  resolved: ResolvedImage,
  p: LayersProgress,
  e: unknown,
): void {
  const { db, cfg } = ctx;
  const msg = e instanceof Error ? e.message : String(e);
  const kind = e instanceof ThinimgError ? e.kind : "internal";
  tx(db, () => {
    markImageBuildFailed(db, img.id, msg, kind);
    finishWork(db, work.id, "failed", { error: msg, kind });
  });
  if (e instanceof ThinimgError && !e.partial) {
    const now = getImageByName(db, cfg.pool, name);
    e.partial = { image: { id: img.id, name, source: o.source, format: resolved.format, state: now?.state ?? "failed" }, layers: p.out, built: p.built };
  }
}

function layerIdOf(ctx: Ctx, chainId: string): number {
  return getLayerByChain(ctx.db, ctx.cfg.pool, chainId)!.id;
}

function layerOut(index: number, l: LayerRow, reused: boolean): UnpackedLayer {
  return { index, chain_id: l.chain_id, thin_id: l.thin_id!, device_name: l.device_name!, reused, stats: statsJson(l.stats) };
}

/**
 * The layer's chain id. A layer whose digest is not known yet is hashed first only when a row could
 * match it — one of the same blob size exists; else it is built under a provisional chain id and
 * named by the read that applies it (an interrupted build of the same bytes is found by that id).
 */
export async function chainFor(ctx: Ctx, parent: LayerRow | null, ref: LayerRef): Promise<string> {
  const parentChain = parent?.chain_id ?? null;
  if (ref.lazy) {
    const provisional = provisionalChainId(parentChain, ref.lazy.key);
    const row = getLayerByChain(ctx.db, ctx.cfg.pool, provisional);
    // an earlier build of these bytes resumes (its digest may be remembered by now) — unless it
    // learnt their digest and the layer has since been built under its real chain id (by another
    // unpack): then that one is looked up
    const builtMeanwhile =
      row !== null &&
      row.digest !== provisional &&
      getLayerByChain(ctx.db, ctx.cfg.pool, chainIdOf(parentChain, identityOf({ diffId: row.diff_id, digest: row.digest }))) !== null;
    if ((row && !builtMeanwhile) || (!row && ref.lazy.known() === null && !anyLayerOfSize(ctx.db, ctx.cfg.pool, ref.size))) {
      ref.lazy.prefetch(); // a remote layer downloads while its device is made
      return provisional;
    }
    if (ref.lazy.known() === null) {
      ctx.progress?.stage(`hash ${ref.label}`);
      await ref.lazy.hash();
    }
  }
  return chainIdOf(parentChain, identityOf(ref));
}

/** Insert the layer row; another process may have inserted the same chain a moment ago. */
function insertLayerOnce(ctx: Ctx, chainId: string, parent: LayerRow | null, ref: LayerRef): LayerRow {
  return tx(ctx.db, () => {
    const existing = getLayerByChain(ctx.db, ctx.cfg.pool, chainId);
    if (existing) return existing;
    return insertLayer(ctx.db, {
      pool: ctx.cfg.pool,
      chainId,
      parentId: parent?.id ?? null,
      parentChainId: parent?.chain_id ?? null,
      // a provisional row is named by its build (layer-build's apply and commit)
      ...(isProvisionalChainId(chainId)
        ? { identity: chainId, diffId: null, digest: chainId }
        : { identity: identityOf(ref), diffId: ref.diffId, digest: ref.digest }),
      size: ref.size,
      virtualSize: parent?.virtual_size ?? ctx.cfg.virtualSize,
    });
  });
}
