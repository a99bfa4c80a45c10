// The contract between image sources/formats, layer application and the pipeline (see
// /docs/images.md). Names here are shared with lib/image/apply and lib/pipeline: change them only
// together.

export type Compression = "none" | "gzip" | "zstd";
/** layer-tar: one tar (plain or compressed) that is not an image archive, e.g. a rootfs tarball. */
export type ImageFormat = "layer-family" | "layer-tar" | "docker-archive" | "oci-layout";

/** The parts of an image config a runtime needs, parsed and validated (OCI image-spec config). */
export interface ImageConfig {
  /** sha256:… of the config blob. */
  digest: string;
  architecture: string | null;
  os: string | null;
  variant: string | null;
  env: string[];
  entrypoint: string[] | null;
  cmd: string[] | null;
  workingDir: string | null;
  user: string | null;
  labels: Record<string, string>;
  /** rootfs.diff_ids: sha256 of each layer's UNCOMPRESSED tar, in order; null when the config has no rootfs. */
  diffIds: string[] | null;
}

export interface LayerRef {
  /** 0-based position; layers apply in this order. */
  index: number;
  /** sha256:… of the blob as stored (possibly compressed). A lazy layer's (`lazy` set) is known only
   *  once lazy.known() is: reading it before throws. */
  readonly digest: string;
  /** sha256:… of the uncompressed tar when known (config diff_ids, or an uncompressed blob). */
  readonly diffId: string | null;
  /** Set when the source names the bytes without reading them (a local file, an S3 object): their
   *  digest may then be unknown until read (ResolveOptions.lazyDigests; lazy.known() is null) —
   *  open() hashes as it reads, so the one read that applies the layer also names it. */
  readonly lazy?: LazyDigest;
  /** Bytes of the blob as stored. */
  size: number;
  compression: Compression;
  /** Short name for messages: "2.tar" (layer family) or "sha256:abcd12345678" (by digest).
   *  Messages from open() say "layer <index+1>/<total> (<label>)". */
  label: string;
  /**
   * The UNCOMPRESSED tar stream. The blob digest, its size, the decompressed-size cap and the
   * diffId (when known) are checked as it is read: the stream errors (ThinimgError) on mismatch,
   * at the latest at EOF. Each call opens a fresh stream.
   */
  open(opts?: OpenOptions): Promise<ReadableStream<Uint8Array>>;
  /**
   * Path of a local file holding exactly the layer's bytes, when they are an uncompressed tar:
   * applyLayerFile reads it faster than open() does, with the same size and digest checks.
   */
  file?: string;
  /**
   * Present when the digest was not computed at resolve (ResolveOptions.lazyLocalDigests): reading
   * `digest` or `diffId` first hashes the file; an apply pass that hashed the bytes it applied
   * hands its result over here instead (a digest already computed must match, else this throws).
   */
  settleDigest?(digest: string): void;
}

export interface LazyDigest {
  /** What identifies the bytes without reading them (a local file's device, inode, size, mtime). */
  key: string;
  /** The digest once a complete read (open() to EOF, or hash()) has computed it. */
  known(): string | null;
  /** Read the blob now and hash it (a committed layer could match it, so its identity is needed first). */
  hash(): Promise<string>;
  /** The layer will be read soon (it is about to be built): a remote one starts downloading. */
  prefetch(): void;
}

export interface OpenOptions {
  /** A lower decompressed-size cap than the image's maxLayerBytes (e.g. what is left of an image budget). */
  maxBytes?: number;
}

export interface ResolvedImage {
  /** The source as given (without a :REF selector). */
  source: string;
  format: ImageFormat;
  /** Tag / ref.name that selected the image, when there was one. */
  name: string | null;
  /** sha256:… of the manifest (OCI) / config (docker-archive) when there is one. */
  id: string | null;
  platform: string | null;
  config: ImageConfig | null;
  layers: LayerRef[];
}

export interface DownloadProgress {
  what: string;
  bytes: number;
  total: number | null;
}

export interface ResolveOptions {
  /** Blob cache lives in <stateDir>/blobs. */
  stateDir: string;
  /** Largest blob (compressed, as stored) accepted; enforced on bytes actually read. Default 8 GiB. */
  maxBlobBytes?: number;
  /** Largest uncompressed layer stream (decompression-bomb guard). Default 10 GiB. */
  maxLayerBytes?: number;
  /** Tag (docker-archive) or org.opencontainers.image.ref.name (OCI); also given as SOURCE:REF. */
  select?: string;
  /** "os/arch[/variant]" for multi-arch indexes; default: the host (linux/amd64 here). */
  platform?: string;
  signal?: AbortSignal;
  /** Environment for S3 endpoint/region/credentials; default process.env. */
  env?: Record<string, string | undefined>;
  onProgress?(p: DownloadProgress): void;
  /** Layers whose digest is not remembered (digest cache) are not hashed up front: see LayerRef.lazy. */
  lazyDigests?: boolean;
  /** Retries of a transient fetch failure (dropped connection, 5xx, 429); default 4 attempts, 1 s doubling. */
  fetchRetry?: { attempts: number; baseDelayMs: number };
  /**
   * Do not hash the plain-tar members of a local layer family at resolve: their digest is
   * computed when applied (LayerRef.settleDigest), so the file is read once. Only for callers
   * that need the digests after applying (extract), not to decide anything before.
   */
  lazyLocalDigests?: boolean;
}

export const DEFAULT_MAX_BLOB_BYTES = 8 * 1024 ** 3;
export const DEFAULT_MAX_LAYER_BYTES = 10 * 1024 ** 3;
