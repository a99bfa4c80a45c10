// resolveImage: SOURCE → fetched, format-detected, verified ResolvedImage whose layers stream their
// uncompressed tars. Remote bytes land in the blob cache first (content-addressed, never partial);
// local files and directories are read in place. Formats are recognised from content:
//   directory: index.json → OCI layout; manifest.json → docker-archive (unpacked); N.tar → layer family
//   file:      (gzip/zstd → decompressed into the cache first) tar with manifest.json → docker-archive,
//              index.json → OCI layout, anything else → a single-layer image (a rootfs tarball: "layer-tar").
import { realpathSync, statSync } from "node:fs";
import { basename } from "node:path";
import { errnoOf, ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { type Archive, DirArchive, TarArchive } from "./archive/archive.ts";
import { BlobCache } from "./cache.ts";
import { decompressStream } from "./compression.ts";
import { sha256File, sha256Hex, tooBig } from "./digest.ts";
import { resolveDockerArchive } from "./format/docker-archive.ts";
import { MAGIC_BYTES, makeLayerRef, sniffCompression } from "./format/layer.ts";
import { orderLayerFamily } from "./format/layer-family.ts";
import { resolveOci } from "./format/oci.ts";
import { parsePlatform } from "./format/platform.ts";
import { download, sameEtag } from "./source/download.ts";
import { S3Bucket, s3Settings } from "./source/s3.ts";
import { parseSource, type SourceSpec } from "./source/spec.ts";
import { StreamedFamily } from "./source/streamed.ts";
import { DEFAULT_MAX_BLOB_BYTES, DEFAULT_MAX_LAYER_BYTES, type LayerRef, type ResolvedImage, type ResolveOptions } from "./types.ts";

export type { LayerRef, ResolvedImage, ResolveOptions } from "./types.ts";

interface Ctx {
  cache: BlobCache;
  maxBlobBytes: number;
  maxLayerBytes: number;
  select: string | null;
  platform: string | undefined;
  signal: AbortSignal | undefined;
  onProgress: ResolveOptions["onProgress"];
  env: Record<string, string | undefined>;
  fetchRetry: ResolveOptions["fetchRetry"];
  lazyDigests: boolean;
  lazyLocalDigests: boolean;
}

export async function resolveImage(ref: string, opts: ResolveOptions): Promise<ResolvedImage> {
  try {
    return await resolve(ref, opts);
  } catch (e) {
    throw fsError(e, opts.stateDir);
  }
}

const FS_HINTS: Record<string, string> = {
  EACCES: "permission denied: make it readable by this user, or run as a user who can read it",
  EPERM: "operation not permitted: check the permissions, or run as a user who can read it",
  ENOSPC: "the filesystem holding the state directory (blob cache) is full: free space or use --state-dir elsewhere",
  EDQUOT: "the disk quota of the state directory (blob cache) is exhausted: free space or use --state-dir elsewhere",
  EROFS: "the state directory (blob cache) is on a read-only filesystem: use --state-dir elsewhere",
  EIO: "the filesystem reported an I/O error; check dmesg",
  ENOENT: "it disappeared while being read; check the path",
  ENOTDIR: "a path component is not a directory; check the path",
  EISDIR: "a directory is where a file is expected; check the image",
  ELOOP: "too many levels of symbolic links; check the path",
  EMFILE: "too many open files: raise the open-file limit (ulimit -n)",
};

/**
 * A failed system call while resolving (unreadable input, full cache…) becomes one input line
 * with the path, the errno code and what to do; details carry code/syscall/path for callers.
 */
function fsError(e: unknown, stateDir: string): unknown {
  const x = errnoOf(e);
  if (!x) return e;
  const { code, path } = x;
  const syscall = x.syscall ?? "read";
  const inCache = path?.startsWith(`${stateDir.replace(/\/+$/, "")}/`) === true;
  const hint = FS_HINTS[code] ?? (inCache ? "the blob cache in the state directory cannot be written; check --state-dir" : "the input cannot be read as given");
  return new ThinimgError("input", `${path ?? "image"}: ${syscall} failed: ${code}`, {
    hint,
    details: { code, syscall, path },
    cause: e,
  });
}

async function resolve(ref: string, opts: ResolveOptions): Promise<ResolvedImage> {
  const spec = parseSource(ref, opts.select);
  if (opts.platform) parsePlatform(opts.platform); // a bad --platform is a usage error whatever the format
  const ctx: Ctx = {
    cache: new BlobCache(opts.stateDir),
    maxBlobBytes: opts.maxBlobBytes ?? DEFAULT_MAX_BLOB_BYTES,
    maxLayerBytes: opts.maxLayerBytes ?? DEFAULT_MAX_LAYER_BYTES,
    select: null,
    platform: opts.platform,
    signal: opts.signal,
    onProgress: opts.onProgress,
    env: opts.env ?? process.env,
    fetchRetry: opts.fetchRetry,
    lazyDigests: opts.lazyDigests === true,
    lazyLocalDigests: opts.lazyLocalDigests === true,
  };

  switch (spec.kind) {
    case "local":
      return resolveLocal(spec, ctx);
    case "http":
      return resolveHttp(spec, ctx);
    case "s3":
      return resolveS3(spec, ctx);
  }
}

type Spec<K extends SourceSpec["kind"]> = Extract<SourceSpec, { kind: K }>;

/** A local file or directory, read in place. */
async function resolveLocal(spec: Spec<"local">, ctx: Ctx): Promise<ResolvedImage> {
  ctx.select = spec.select;
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(spec.path);
  } catch (e) {
    throw new ThinimgError("input", `${spec.path}: ${(e as NodeJS.ErrnoException).code ?? "unreadable"}`, {
      hint: "check the path and its permissions",
    });
  }
  if (st.isDirectory()) return resolveArchive(new DirArchive(spec.path), spec.path, ctx, null);
  if (!st.isFile()) {
    throw new ThinimgError("input", `${spec.path}: not a regular file or directory`, {
      hint: "give an image archive, an OCI layout or a layer-family directory",
    });
  }
  if (st.size > ctx.maxBlobBytes) throw tooBig(spec.path, ctx.maxBlobBytes);
  const memo = `local:${realpathSync(spec.path)}:${st.size}:${st.mtimeMs}:${st.ino}`;
  return resolveFile(spec.path, spec.path, ctx, { digest: null, memo, cached: false });
}

/** The first candidate URL that exists (a URL:REF source has two readings). */
async function resolveHttp(spec: Spec<"http">, ctx: Ctx): Promise<ResolvedImage> {
  let first404: unknown = null;
  for (const c of spec.candidates) {
    const what = displayUrl(c.url);
    try {
      const d = await download(ctx.cache, {
        url: c.url,
        what,
        key: urlKey(c.url),
        maxBytes: ctx.maxBlobBytes,
        signal: ctx.signal,
        onProgress: ctx.onProgress,
        retry: ctx.fetchRetry,
      });
      ctx.select = c.select;
      return await resolveFile(d.path, what, ctx, { digest: d.digest, memo: `blob:${d.digest}`, cached: true });
    } catch (e) {
      // a 404 moves on to the next reading of URL:REF; if none exists, report the URL as given
      if (!(e instanceof ThinimgError && e.details?.status === 404)) throw e;
      first404 ??= e;
    }
  }
  throw first404;
}

/** An S3 object (the first candidate key that exists) or, for a prefix, a layer family. */
async function resolveS3(spec: Spec<"s3">, ctx: Ctx): Promise<ResolvedImage> {
  const bucket = new S3Bucket(spec.bucket, s3Settings(ctx.env));
  log.debug(`s3 ${bucket.anonymous ? "anonymous" : "signed"} access to ${spec.bucket} via ${bucket.settings.endpoint ?? "AWS"}`);
  if (spec.prefix) return resolveS3Family(bucket, spec.candidates[0]!.key, ctx);
  for (const c of spec.candidates) {
    const obj = await bucket.head(c.key, ctx.signal);
    if (!obj) continue;
    const what = bucket.uri(c.key);
    const d = await download(ctx.cache, {
      url: bucket.url(c.key, "GET"),
      what,
      key: bucket.cacheKey(c.key),
      maxBytes: ctx.maxBlobBytes,
      pin: { etag: obj.etag, size: obj.size },
      signal: ctx.signal,
      onProgress: ctx.onProgress,
      retry: ctx.fetchRetry,
    });
    ctx.select = c.select;
    return resolveFile(d.path, what, ctx, { digest: d.digest, memo: `blob:${d.digest}`, cached: true });
  }
  throw new ThinimgError("input", `${bucket.uri(spec.candidates[0]!.key)}: no such object`, {
    hint: "check the key; for a layer family end the prefix with /",
  });
}

/** Messages never show credentials or query strings (presigned tokens). */
function displayUrl(url: string): string {
  const u = new URL(url);
  return `${u.protocol}//${u.host}${u.pathname}${u.search ? "?…" : ""}`;
}

function urlKey(url: string): string {
  const u = new URL(url);
  u.username = "";
  u.password = "";
  return `http:${u.origin}${u.pathname}${u.search ? `?sha256=${sha256Hex(u.search)}` : ""}`;
}

interface FileInfo {
  /** Known sha256 of the file (cached blobs), else null. */
  digest: string | null;
  /** Key under which the decompressed copy of this file is remembered. */
  memo: string;
  /** The file is a cache blob (evict on mismatch). */
  cached: boolean;
}

async function resolveFile(path: string, what: string, ctx: Ctx, info: FileInfo): Promise<ResolvedImage> {
  const head = new Uint8Array(await Bun.file(path).slice(0, MAGIC_BYTES).arrayBuffer());
  const compression = sniffCompression(head, what);
  if (compression === "none") return resolveArchive(new TarArchive(path, what), what, ctx, { path, ...info });
  // A compressed archive (docker save | gzip, rootfs.tar.zst…): decompress once into the cache so it
  // can be indexed and read by offset; remembered, so a re-run does not decompress again.
  const key = `decompressed:${info.memo}`;
  let rec = ctx.cache.lookupSource(key);
  if (!rec) {
    // Bounded like any stored blob, and at least like one layer (it may be a single rootfs layer).
    const cap = Math.max(ctx.maxBlobBytes, ctx.maxLayerBytes);
    const stored = await ctx.cache.ingest(decompressStream(Bun.file(path).stream(), compression, { maxBytes: cap, what }), {
      what,
      maxBytes: cap,
      signal: ctx.signal,
    });
    ctx.cache.recordSource({ key, etag: null, size: stored.size, digest: stored.digest });
    rec = ctx.cache.lookupSource(key)!;
  }
  const p = ctx.cache.path(rec.digest);
  return resolveArchive(new TarArchive(p, what), what, ctx, { path: p, digest: rec.digest, memo: key, cached: true });
}

/** Names that only occur in image archives: a tar holding them without a manifest is broken, not a rootfs. */
const IMAGE_MARKERS = ["manifest.json", "index.json", "oci-layout", "repositories", "blobs"];

async function resolveArchive(archive: Archive, source: string, ctx: Ctx, file: (FileInfo & { path: string }) | null): Promise<ResolvedImage> {
  const select = ctx.select ?? undefined;
  const top = archive.topLevel();
  if (archive instanceof TarArchive && !archive.complete && top.some((n) => IMAGE_MARKERS.includes(n))) {
    throw new ThinimgError("policy", `${source}: an image archive with thousands of members`, {
      hint: "an image archive holds a few files per layer; this one is broken or hostile",
    });
  }
  if (archive.size("manifest.json") !== null) {
    return resolveDockerArchive(archive, { source, select, maxLayerBytes: ctx.maxLayerBytes, maxBlobBytes: ctx.maxBlobBytes });
  }
  if (archive.size("index.json") !== null) {
    return resolveOci(archive, { source, select, platform: ctx.platform, maxLayerBytes: ctx.maxLayerBytes });
  }
  const marker = top.find((n) => IMAGE_MARKERS.includes(n));
  if (marker) {
    throw new ThinimgError("input", `${source}: has ${marker} but no manifest.json or index.json`, {
      hint: "the image archive is incomplete; save or copy it again",
    });
  }
  if (archive instanceof DirArchive) return resolveDirFamily(archive, source, ctx);
  // A plain tar that is not an image archive: a single-layer image (e.g. a rootfs tarball).
  if (ctx.select) {
    throw new ThinimgError("input", `${source}: is a single layer, not an image archive; it has no image "${ctx.select}"`, {
      hint: "drop the :REF (or extract --select)",
    });
  }
  const f = file!;
  const digest = f.digest ?? (await sha256File(f.path, ctx.maxBlobBytes)).digest;
  const size = statSync(f.path).size;
  const layer = makeLayerRef({
    index: 0,
    total: 1,
    digest,
    diffId: null,
    size,
    compression: "none",
    name: basename(source),
    maxLayerBytes: ctx.maxLayerBytes,
    openRaw: () => Bun.file(f.path).stream(),
    file: f.path,
    onMismatch: f.cached ? () => ctx.cache.evict(digest) : undefined,
  });
  return { source, format: "layer-tar", name: null, id: null, platform: null, config: null, layers: [layer] };
}

async function resolveDirFamily(dir: DirArchive, source: string, ctx: Ctx): Promise<ResolvedImage> {
  const names = dir.topLevel().filter((n) => !dir.isDirectory(n));
  const order = orderLayerFamily(names, source);
  if (order.ignored.length) log.debug(`${source}: ignoring ${order.ignored.join(", ")}`);
  if (ctx.select) {
    throw new ThinimgError("input", `${source}: a layer family holds one image; it has no image "${ctx.select}"`, {
      hint: "drop the :REF (or extract --select)",
    });
  }
  const total = order.layers.length;
  const layers: LayerRef[] = [];
  for (const [i, m] of order.layers.entries()) {
    // Like docker and OCI directories: a member must be a regular file inside the directory (a
    // symlink is followed only while it stays inside).
    const p = dir.file(m.name);
    if (p === null) throw new ThinimgError("input", `${source}: ${m.name} is not a regular file`);
    const compression = sniffCompression(await dir.head(m.name, MAGIC_BYTES), `${source}/${m.name}`);
    layers.push(await localLayer(ctx, p, { index: i, total, name: m.name, what: `${source}/${m.name}`, compression }));
  }
  return { source, format: "layer-family", name: null, id: null, platform: null, config: null, layers };
}

/** What names a local file's bytes without reading them: a change of any of these means new bytes. */
export function fileIdentity(path: string): { key: string; size: number } {
  const st = statSync(path, { bigint: true });
  return { key: `file:${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}`, size: Number(st.size) };
}

/**
 * A layer read in place from a local file. Its digest comes from the digest index when the file's
 * identity is remembered; else it is hashed now (one read, ~1 GB/s) — or, with lazyDigests, by the
 * read that applies it. Either way open() checks the bytes it reads against it.
 */
async function localLayer(
  ctx: Ctx,
  p: string,
  m: { index: number; total: number; name: string; what: string; compression: LayerRef["compression"] },
): Promise<LayerRef> {
  const id = fileIdentity(p);
  if (id.size > ctx.maxBlobBytes) throw tooBig(m.what, ctx.maxBlobBytes);
  let digest = ctx.cache.lookupDigest(id.key)?.digest ?? null;
  if (digest === null && !ctx.lazyDigests && !(ctx.lazyLocalDigests && m.compression === "none")) {
    digest = (await sha256File(p, ctx.maxBlobBytes)).digest;
    ctx.cache.recordDigest(id.key, digest, id.size);
  }
  return makeLayerRef({
    index: m.index,
    total: m.total,
    digest,
    lazyKey: id.key,
    diffId: null,
    size: id.size,
    compression: m.compression,
    name: m.name,
    maxLayerBytes: ctx.maxLayerBytes,
    openRaw: () => Bun.file(p).stream(),
    file: p,
    hashOnDemand: ctx.lazyLocalDigests,
    onMismatch: () => ctx.cache.forgetDigest(id.key),
    onDigest: (d, n) => ctx.cache.recordDigest(id.key, d, n),
  });
}

async function resolveS3Family(bucket: S3Bucket, prefix: string, ctx: Ctx): Promise<ResolvedImage> {
  const source = bucket.uri(prefix);
  if (ctx.select) {
    throw new ThinimgError("input", `${source}: a layer family holds one image; it has no image "${ctx.select}"`, {
      hint: "drop the extract --select",
    });
  }
  const objects = (await bucket.list(prefix, ctx.signal)).filter((o) => o.key !== prefix);
  if (objects.length === 0) {
    throw new ThinimgError("input", `${source}: no objects under this prefix`, {
      hint: "check the bucket, the prefix (it must end with /) and the endpoint",
    });
  }
  const byName = new Map(objects.map((o) => [o.key.slice(prefix.length), o]));
  const order = orderLayerFamily(byName.keys(), source);
  if (order.ignored.length) log.debug(`${source}: ignoring ${order.ignored.join(", ")}`);
  const total = order.layers.length;
  const objs = order.layers.map((m) => byName.get(m.name)!);
  if (ctx.lazyDigests) return streamedS3Family(bucket, source, order.layers, objs, ctx);
  // Layers download in parallel (a few at a time); progress is reported for the family as a whole.
  const done = new Array<number>(total).fill(0);
  const totalBytes = objs.reduce((a, o) => a + o.size, 0);
  const abort = new AbortController();
  const onAbort = () => abort.abort();
  ctx.signal?.addEventListener("abort", onAbort, { once: true });
  let downloads: Awaited<ReturnType<typeof download>>[];
  try {
    downloads = await mapLimit(objs, DOWNLOAD_CONCURRENCY, abort, (obj, i) =>
      download(ctx.cache, {
        url: bucket.url(obj.key, "GET"),
        what: bucket.uri(obj.key),
        key: bucket.cacheKey(obj.key),
        maxBytes: ctx.maxBlobBytes,
        pin: { etag: obj.etag, size: obj.size },
        signal: abort.signal,
        onProgress: ctx.onProgress
          ? (p) => {
              done[i] = p.bytes;
              ctx.onProgress!({ what: source, bytes: done.reduce((a, b) => a + b, 0), total: totalBytes });
            }
          : undefined,
        retry: ctx.fetchRetry,
      }),
    );
  } finally {
    ctx.signal?.removeEventListener("abort", onAbort);
  }
  const layers: LayerRef[] = [];
  for (const [i, m] of order.layers.entries()) {
    const d = downloads[i]!;
    const what = bucket.uri(objs[i]!.key);
    const compression = sniffCompression(new Uint8Array(await Bun.file(d.path).slice(0, MAGIC_BYTES).arrayBuffer()), what);
    layers.push(
      makeLayerRef({
        index: i,
        total,
        digest: d.digest,
        diffId: null,
        size: d.size,
        compression,
        name: m.name,
        maxLayerBytes: ctx.maxLayerBytes,
        openRaw: () => Bun.file(d.path).stream(),
        onMismatch: () => ctx.cache.evict(d.digest),
      }),
    );
  }
  return { source, format: "layer-family", name: null, id: null, platform: null, config: null, layers };
}

/** Layers a streamed family downloads ahead of the one being applied. */
const READ_AHEAD_LAYERS = 1;

/**
 * A layer family whose objects are applied while they download (lib/image/source/streamed.ts): no
 * object is fetched here. One the cache holds already (same ETag and size) is read from the cache;
 * the others stream, their digest remembered (digest index) or learnt from their download.
 */
async function streamedS3Family(
  bucket: S3Bucket,
  source: string,
  members: { name: string }[],
  objs: { key: string; etag: string | null; size: number }[],
  ctx: Ctx,
): Promise<ResolvedImage> {
  const total = objs.length;
  const totalBytes = objs.reduce((a, o) => a + o.size, 0);
  const done = new Array<number>(total).fill(0);
  const dl = (obj: (typeof objs)[number], i: number) => ({
    url: bucket.url(obj.key, "GET"),
    what: bucket.uri(obj.key),
    key: bucket.cacheKey(obj.key),
    maxBytes: ctx.maxBlobBytes,
    pin: { etag: obj.etag, size: obj.size },
    signal: ctx.signal,
    onProgress: ctx.onProgress
      ? (p: { bytes: number }) => {
          done[i] = p.bytes;
          ctx.onProgress!({ what: source, bytes: done.reduce((a, b) => a + b, 0), total: totalBytes });
        }
      : undefined,
    retry: ctx.fetchRetry,
  });
  const family = new StreamedFamily(
    ctx.cache,
    objs.map((o, i) => ({ download: dl(o, i) })),
    READ_AHEAD_LAYERS,
  );
  const heads = await Promise.all(objs.map((o) => cachedOrHead(bucket, o, ctx)));
  const layers: LayerRef[] = [];
  for (const [i, m] of members.entries()) {
    const obj = objs[i]!;
    const what = bucket.uri(obj.key);
    if (obj.size > ctx.maxBlobBytes) throw tooBig(what, ctx.maxBlobBytes);
    const h = heads[i]!;
    const compression = sniffCompression(h.head, what);
    // what names the object's bytes without reading them: its key, ETag and size
    const lazyKey = `${bucket.cacheKey(obj.key)}:${obj.etag ?? ""}:${obj.size}`;
    const cachedPath = h.cached?.path ?? null;
    const digest = h.cached?.digest ?? ctx.cache.lookupDigest(lazyKey)?.digest ?? null;
    layers.push(
      makeLayerRef({
        index: i,
        total,
        digest,
        lazyKey,
        diffId: null,
        size: obj.size,
        compression,
        name: m.name,
        maxLayerBytes: ctx.maxLayerBytes,
        openRaw: () => (cachedPath ? Bun.file(cachedPath).stream() : family.open(i)),
        // the download hashes what it writes into the cache; the reader follows that very file
        sourceDigest: cachedPath ? undefined : () => family.fetched(i),
        prefetch: cachedPath ? undefined : () => family.prefetch(i),
        onMismatch: () => {
          ctx.cache.forgetDigest(lazyKey);
          if (digest) ctx.cache.evict(digest);
        },
        onDigest: (d, n) => ctx.cache.recordDigest(lazyKey, d, n),
      }),
    );
  }
  return { source, format: "layer-family", name: null, id: null, platform: null, config: null, layers };
}

/** The object's blob when the cache holds this very version; else its first bytes (a ranged GET
 * pinned to the listed ETag), which say how it is compressed before it is downloaded. */
async function cachedOrHead(
  bucket: S3Bucket,
  obj: { key: string; etag: string | null; size: number },
  ctx: Ctx,
): Promise<{ cached: { path: string; digest: string } | null; head: Uint8Array }> {
  const rec = ctx.cache.lookupSource(bucket.cacheKey(obj.key));
  if (rec && sameEtag(rec.etag, obj.etag) && rec.size === obj.size) {
    const path = ctx.cache.path(rec.digest);
    return { cached: { path, digest: rec.digest }, head: new Uint8Array(await Bun.file(path).slice(0, MAGIC_BYTES).arrayBuffer()) };
  }
  return { cached: null, head: await bucket.firstBytes(obj.key, MAGIC_BYTES, obj.etag, ctx.signal) };
}

const DOWNLOAD_CONCURRENCY = 4;

/**
 * fn over items, at most `limit` at a time, results in order. The first failure aborts the rest
 * (through `abort`) and is the one thrown — after every started call has settled, so no download
 * is left writing a temp file behind our back.
 */
async function mapLimit<T, R>(items: T[], limit: number, abort: AbortController, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  let failure: { e: unknown } | null = null;
  const worker = async () => {
    while (!failure && next < items.length) {
      const i = next++;
      try {
        out[i] = await fn(items[i]!, i);
      } catch (e) {
        if (!failure) {
          failure = { e };
          abort.abort();
        }
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failure) throw (failure as { e: unknown }).e;
  return out;
}
