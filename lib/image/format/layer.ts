// Building a LayerRef: the one place where a layer's bytes are checked as they are read — blob size
// and digest (raw bytes), decompressed-size cap (bomb guard), diff_id (uncompressed bytes).
import { closeSync, openSync, readSync } from "node:fs";
import { ThinimgError } from "../../errors.ts";
import { decompressStream, detectCompression, MAGIC_BYTES, unsupportedCompression } from "../compression.ts";
import { verifyTransform } from "../stream.ts";
import type { Compression, LayerRef } from "../types.ts";

export interface LayerSpec {
  index: number;
  total: number;
  /** null: not known until the bytes are read (then `lazyKey` must name the bytes). */
  digest: string | null;
  /** What identifies the bytes without reading them (LayerRef.lazy.key); given, the ref has `lazy`. */
  lazyKey?: string;
  diffId: string | null;
  size: number;
  compression: Compression;
  /** "2.tar", "sha256:abcd…": appended to "layer 2/5". */
  name: string;
  maxLayerBytes: number;
  openRaw(): ReadableStream<Uint8Array>;
  /** The blob is this local file (LayerRef.file when it is an uncompressed tar). */
  file?: string;
  /** Called when the raw bytes do not match the digest (e.g. evict a cache file). */
  onMismatch?(): void;
  /** The raw stream is hashed by its source (a download into the blob cache): this resolves with
   * that digest once the stream has ended, so open() checks it instead of hashing the bytes again. */
  sourceDigest?(): Promise<{ digest: string; size: number }>;
  /** A lazy layer about to be read: start fetching it (and what follows it). */
  prefetch?(): void;
  /** A lazy local plain tar whose digest, read before any apply, is computed then (extract);
   * otherwise reading it early is a bug (the pipeline must never read a layer twice). */
  hashOnDemand?: boolean;
  /** Called once a complete read computed the digest of a lazy layer (e.g. remember it). */
  onDigest?(digest: string, size: number): void;
}

export function layerLabel(index: number, total: number, name: string): string {
  return `${index + 1}/${total} (${name})`;
}

export function makeLayerRef(s: LayerSpec): LayerRef {
  const what = `layer ${layerLabel(s.index, s.total, s.name)}`;
  if (s.digest === null && s.lazyKey === undefined) throw new ThinimgError("internal", `${what}: neither a digest nor what names its bytes`);
  let digest = s.digest;
  const learn = (d: string, n: number) => {
    if (digest !== null) return;
    digest = d;
    s.onDigest?.(d, n);
  };
  const file = s.compression === "none" ? s.file : undefined;
  const known = (): string => {
    // Hashing on demand blocks, but only a caller that asked for lazy digests and then reads one
    // before applying gets here.
    if (digest === null && file !== undefined && s.hashOnDemand) learn(`sha256:${sha256FileSync(file)}`, s.size);
    if (digest === null) throw new ThinimgError("internal", `${what}: digest read before the layer was hashed`);
    return digest;
  };
  // An uncompressed blob's digest IS its diff_id; one hash then checks both.
  const diffIdOf = (d: string) => s.diffId ?? (s.compression === "none" ? d : null);
  return {
    index: s.index,
    get digest() {
      return known();
    },
    get diffId() {
      return s.diffId ?? (s.compression === "none" ? known() : null);
    },
    ...(s.lazyKey !== undefined
      ? {
          lazy: {
            key: s.lazyKey,
            known: () => digest,
            prefetch: () => s.prefetch?.(),
            async hash() {
              if (digest !== null) return digest;
              const reader = s
                .openRaw()
                .pipeThrough(verifyTransform({ what, size: s.size, onDigest: learn }))
                .getReader();
              while (!(await reader.read()).done) {}
              return known();
            },
          },
        }
      : {}),
    size: s.size,
    compression: s.compression,
    label: s.name,
    ...(file !== undefined ? { file } : {}),
    ...(s.digest === null
      ? {
          settleDigest(d: string) {
            if (digest !== null && digest !== d) {
              s.onMismatch?.();
              throw new ThinimgError("input", `${what}: digest mismatch: expected ${digest}, got ${d}`, {
                hint: "the file changed while being read; run again",
              });
            }
            learn(d, s.size);
          },
        }
      : {}),
    async open(o) {
      // a lazy layer not hashed yet: hashed as it is read (verifyTransform reports it at EOF)
      const expect = digest;
      const raw = s.sourceDigest
        ? s.openRaw().pipeThrough(sourceChecked(what, expect, s.sourceDigest, s.onMismatch, learn))
        : s.openRaw().pipeThrough(verifyTransform({ what, digest: expect, size: s.size, onMismatch: s.onMismatch, onDigest: learn }));
      const maxBytes = Math.min(s.maxLayerBytes, o?.maxBytes ?? Number.POSITIVE_INFINITY);
      const out = decompressStream(raw, s.compression, { maxBytes, what });
      // (An uncompressed blob whose digest differs from its diff_id fails one of the two checks.)
      const diffId = expect === null ? s.diffId : diffIdOf(expect);
      if (diffId && diffId !== expect) {
        return out.pipeThrough(verifyTransform({ what, digest: diffId, digestName: "diff_id" }));
      }
      return out;
    },
  };
}

/** A pass-through that, at EOF, checks the digest its source computed (see LayerSpec.sourceDigest). */
function sourceChecked(
  what: string,
  expect: string | null,
  sourceDigest: () => Promise<{ digest: string; size: number }>,
  onMismatch: (() => void) | undefined,
  learn: (digest: string, size: number) => void,
): TransformStream<Uint8Array, Uint8Array> {
  return new TransformStream({
    async flush(controller) {
      const got = await sourceDigest();
      if (expect && got.digest !== expect) {
        onMismatch?.();
        controller.error(
          new ThinimgError("input", `${what}: digest mismatch: expected ${expect}, got ${got.digest}`, {
            hint: "the image is corrupt or was tampered with; do not use it",
          }),
        );
        return;
      }
      learn(got.digest, got.size);
    },
  });
}

/** sha256 hex of a file, read synchronously (a lazy digest asked for before the layer was read). */
function sha256FileSync(path: string): string {
  const h = new Bun.CryptoHasher("sha256");
  const buf = Buffer.allocUnsafe(1 << 20);
  const fd = openSync(path, "r");
  try {
    for (let n = readSync(fd, buf); n > 0; n = readSync(fd, buf)) h.update(buf.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return h.digest("hex");
}

/**
 * After a consumer failed on a layer's stream (e.g. "not a tar archive"), re-read the layer to the
 * end: when its bytes do not match their digest / diff_id, that is the real cause to report.
 * Returns the integrity error, or null when the layer is intact. Reads the layer once more; used
 * on failure paths only.
 */
export async function integrityError(layer: LayerRef): Promise<ThinimgError | null> {
  try {
    const reader = (await layer.open()).getReader();
    for (;;) {
      const r = await reader.read();
      if (r.done) return null;
    }
  } catch (e) {
    return e instanceof ThinimgError && /(digest|diff_id) mismatch|truncated|more bytes than/.test(e.message) ? e : null;
  }
}

/** Compression of a blob from its first bytes; refuses formats we recognise but cannot read. */
export function sniffCompression(first: Uint8Array, what: string): Compression {
  const other = unsupportedCompression(first);
  if (other) {
    throw new ThinimgError("input", `${what}: ${other}-compressed; layers must be plain tar, gzip or zstd`, {
      hint: `recompress it, e.g. ${other === "zip" ? "unzip and tar" : `${other} -dc FILE | gzip`}`,
    });
  }
  return detectCompression(first);
}

export { MAGIC_BYTES };
