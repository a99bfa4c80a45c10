// applyLayer: one layer's UNCOMPRESSED tar stream onto a root directory, with umoci/containerd
// semantics, safe against hostile archives. Contract: /tmp/brief/contracts.md (lib/image/), rules
// and decisions: docs/layer-apply.md.
import { realpathSync, statSync } from "node:fs";
import { errorMessage, ThinimgError } from "../../errors.ts";
import { Applier } from "./applier.ts";
import { byteString } from "./bytepath.ts";
import type { FileOut } from "./file-out.ts";
import { FileReadError, type FileReadResult, fileSource } from "./file-source.ts";
import { displayName, type Limits, mergeLimits, RuleError } from "./rules.ts";
import { TarFormatError, TarReader } from "./tar-reader.ts";

export { warmFileReader } from "./file-source.ts";
export { DEFAULT_LIMITS, type Limits } from "./rules.ts";

export interface ApplyOptions {
  /**
   * Create device nodes and FIFOs, as root only: without it they are skipped (counted); with it as
   * non-root, FIFOs are skipped (counted) and char/block devices refused.
   */
  devices?: boolean;
  limits?: Partial<Limits>;
  /** For messages: "layer <label>: entry <path>: <rule>". */
  layerLabel?: string;
  /** Called after each input chunk with the uncompressed tar bytes read so far. */
  onProgress?(bytes: number): void;
  /** chown to the numeric uid/gid of each entry. Default: true when running as root. */
  sameOwner?: boolean;
}

export interface ApplyStats {
  /** Entries in the layer (files, dirs, links, devices, whiteout markers). */
  entries: number;
  /** Uncompressed tar bytes read (the layer's diff size, incl. headers and padding). */
  bytes: number;
  /** Whiteout markers (.wh.NAME and .wh..wh..opq) applied. */
  whiteouts: number;
  durationMs: number;
  /** Device nodes and FIFOs skipped (`devices` off, or a FIFO when not root). */
  skipped: number;
  /** Bytes of holes in sparse files: their apparent size beyond the data stored (budgets count it). */
  holes: number;
}

type Input = ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

/** Reads kept in flight on the input (each at most one source chunk, typically 64-512 KiB). */
const READ_AHEAD = 2;

export async function applyLayer(input: Input, root: string, opts: ApplyOptions = {}): Promise<ApplyStats> {
  return applyChunks(chunks(input), root, opts);
}

/** A layer tar that is a local file: its bytes and, when known, their digest and count. */
export interface LayerFile {
  path: string;
  /** sha256:… the bytes must have; checked at EOF (the layer fails as with a damaged stream). */
  digest?: string | null;
  /** Exact byte count expected; default the file's size now. */
  size?: number | null;
  /** For messages: "layer 2/4 (2.tar)". */
  what?: string;
}

/**
 * applyLayer from a local UNCOMPRESSED tar file, faster than from a stream of it: buffers are
 * reused, and a big file is read and hashed on another thread, which also writes the files' data
 * and final metadata out while this one parses and creates them. The sha256 of
 * the bytes applied is computed in the same pass, returned, and checked against `file.digest`.
 */
export async function applyLayerFile(file: LayerFile, root: string, opts: ApplyOptions = {}): Promise<ApplyStats & { digest: string }> {
  const what = file.what ?? `layer ${opts.layerLabel ?? file.path}`;
  let size = file.size ?? null;
  if (size === null) {
    try {
      size = statSync(file.path).size;
    } catch (e) {
      throw fileError(new FileReadError(errorMessage(e), (e as NodeJS.ErrnoException).code), what);
    }
  }
  const read: FileReadResult = { digest: null, size: 0 };
  let stats: ApplyStats;
  try {
    const src = fileSource(file.path, size, read);
    stats = await applyChunks(src.chunks, root, opts, src.out);
  } catch (e) {
    if (e instanceof FileReadError) throw fileError(e, what);
    throw e;
  }
  if (read.size !== size) {
    throw new ThinimgError("input", `${what}: ${read.size < size ? `truncated: ${read.size} of ${size} bytes` : `more bytes than the ${size} declared`}`, {
      hint: "the file changed while being read; run again",
    });
  }
  if (file.digest && read.digest !== file.digest) {
    throw new ThinimgError("input", `${what}: digest mismatch: expected ${file.digest}, got ${read.digest}`, {
      hint: "the image is corrupt or was tampered with; do not use it",
    });
  }
  return { ...stats, digest: read.digest! };
}

function fileError(e: FileReadError, what: string): ThinimgError {
  return new ThinimgError("input", `${what}: reading the layer failed: ${e.message}`, {
    hint: "the layer file could not be read; check it exists and is readable",
    details: { code: e.code ?? null },
    cause: e,
  });
}

async function applyChunks(input: AsyncIterable<Uint8Array>, root: string, opts: ApplyOptions, out: FileOut | null = null): Promise<ApplyStats> {
  const started = performance.now();
  const label = opts.layerLabel ?? "-";
  const limits = mergeLimits(opts.limits);
  const realRoot = checkRoot(root, label);
  const isRoot = process.getuid?.() === 0;
  const sameOwner = opts.sameOwner ?? isRoot;
  const applier = new Applier(byteString(realRoot), {
    limits,
    devices: opts.devices === true,
    sameOwner,
    xattrs: isRoot,
    isRoot,
    out,
  });
  const reader = new TarReader(applier);
  let bytes = 0;

  try {
    for await (const chunk of input) {
      bytes += chunk.length;
      if (bytes + applier.sparseBytes > limits.maxTotalBytes) {
        throw new ThinimgError("policy", `layer ${label}: uncompressed size exceeds ${limits.maxTotalBytes} bytes (maxTotalBytes)`, {
          hint: "raise --max-bytes / THINIMG_MAX_LAYER_SIZE if the image is legitimate",
          details: { layer: label, rule: "maxTotalBytes" },
        });
      }
      reader.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      opts.onProgress?.(bytes);
    }
    reader.end();
    applier.finish();
  } catch (e) {
    applier.abort();
    if (e instanceof FileReadError) throw e;
    throw toThinimgError(e, label, applier.current);
  }

  return {
    entries: applier.entries,
    bytes,
    whiteouts: applier.whiteouts,
    durationMs: Math.round(performance.now() - started),
    skipped: applier.skipped,
    holes: applier.sparseBytes,
  };
}

function checkRoot(root: string, label: string): string {
  let real: string;
  try {
    real = realpathSync(root);
  } catch (e) {
    throw new ThinimgError("input", `layer ${label}: destination ${root} is not accessible (${errorMessage(e)})`, {
      hint: "create the destination directory first",
    });
  }
  if (!statSync(real).isDirectory()) {
    throw new ThinimgError("input", `layer ${label}: destination ${root} is not a directory`);
  }
  if (real === "/") throw new ThinimgError("usage", `layer ${label}: refusing to apply a layer onto /`);
  return real;
}

/** An error raised by the input stream itself (not by the archive or the filesystem). */
class SourceError extends Error {
  constructor(readonly original: unknown) {
    super(errorMessage(original));
  }
}

/**
 * Chunks of the input. Nothing more is read while a chunk is being written out beyond the small
 * read-ahead (backpressure for free). Input is drained past the tar end marker so that the source
 * can verify its digest at EOF; an error cancels the source.
 */
async function* chunks(input: Input): AsyncGenerator<Uint8Array> {
  if (input instanceof ReadableStream) {
    const r = input.getReader();
    let done = false;
    try {
      // Read-ahead: a few reads stay in flight while this chunk is written out, so the source's
      // I/O and decompression (other threads) overlap our synchronous writes, and a busy
      // scheduler's wake-up latency is paid once per batch instead of once per chunk.
      const pending: ReturnType<typeof r.read>[] = [];
      const fill = () => {
        while (pending.length < READ_AHEAD) {
          const p = r.read();
          p.catch(() => {}); // surfaced by the await below, in order
          pending.push(p);
        }
      };
      fill();
      for (;;) {
        let res: Awaited<ReturnType<typeof r.read>>;
        try {
          res = await pending.shift()!;
        } catch (e) {
          throw new SourceError(e);
        }
        if (res.done) {
          done = true;
          return;
        }
        fill();
        yield res.value;
      }
    } finally {
      if (!done) await r.cancel().catch(() => {});
      r.releaseLock();
    }
  } else {
    const it = input[Symbol.asyncIterator]();
    let done = false;
    try {
      for (;;) {
        let res: IteratorResult<Uint8Array>;
        try {
          res = await it.next();
        } catch (e) {
          done = true; // a failed iterator is finished
          throw new SourceError(e);
        }
        if (res.done) {
          done = true;
          return;
        }
        yield res.value;
      }
    } finally {
      if (!done) await it.return?.();
    }
  }
}

const FS_HINTS: Record<string, string> = {
  ENOSPC: "the destination filesystem is full",
  EDQUOT: "the destination filesystem quota is exhausted",
  EROFS: "the destination filesystem is read-only",
  EIO: "the destination filesystem reported an I/O error; check dmesg",
  EPERM: "permission denied: run as root (owners, devices and xattrs need it)",
  EACCES: "permission denied on the destination",
  EOPNOTSUPP: "the destination filesystem does not support this (xattrs?); use ext4",
  ENAMETOOLONG: "a path is too long for the destination filesystem",
};

function toThinimgError(e: unknown, label: string, entry: string | null): unknown {
  const where = entry === null ? `layer ${label}` : `layer ${label}: entry ${displayName(entry)}`;
  if (e instanceof SourceError) {
    // digest mismatch, decompression bomb, transport: the source says what was wrong
    if (e.original instanceof ThinimgError) return e.original;
    return new ThinimgError("input", `layer ${label}: reading the layer failed: ${e.message}`, {
      hint: "the layer data could not be read; fetch the image again",
      details: { layer: label },
      cause: e.original,
    });
  }
  if (e instanceof ThinimgError) return e;
  if (e instanceof RuleError) {
    return new ThinimgError(e.kind, `${where}: ${e.rule}`, {
      hint: e.hint,
      details: { layer: label, entry: entry === null ? null : displayName(entry), rule: e.rule },
    });
  }
  if (e instanceof TarFormatError) {
    const msg =
      e.entry === null
        ? `layer ${label}: ${e.message}`
        : e.inEntry
          ? `layer ${label}: entry ${displayName(e.entry)}: ${e.message}`
          : `layer ${label}: ${e.message} (after entry ${displayName(e.entry)})`;
    return new ThinimgError("input", msg, {
      hint: e.unsupported
        ? "the layer uses a tar feature thinimg does not support (see docs/layer-apply.md); rebuild it with docker, buildkit or GNU tar"
        : "the layer is not a valid tar archive: it is corrupt, truncated or not a layer",
      details: { layer: label, entry: e.entry === null ? null : displayName(e.entry), offset: e.offset, unsupported: e.unsupported },
    });
  }
  const code = (e as NodeJS.ErrnoException | null)?.code;
  if (typeof code === "string") {
    const sys = (e as NodeJS.ErrnoException).syscall ?? "write";
    return new ThinimgError("input", `${where}: ${sys} failed: ${code}`, {
      hint: FS_HINTS[code] ?? "the entry cannot be applied as written",
      details: { layer: label, entry: entry === null ? null : displayName(entry), code, syscall: sys },
      cause: e,
    });
  }
  return e;
}
