// Building a LayerRef: the one place where a layer's bytes are checked as they are read — blob size
// and digest (raw bytes), decompressed-size cap (bomb guard), diff_id (uncompressed bytes).
import { ThinimgError } from "../../errors.ts";
import { decompressStream, detectCompression, MAGIC_BYTES, unsupportedCompression } from "../compression.ts";
import { verifyTransform } from "../stream.ts";
import type { Compression, LayerRef } from "../types.ts";

export interface LayerSpec {
  index: number;
  total: number;
  digest: string;
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
}

export function layerLabel(index: number, total: number, name: string): string {
  return `${index + 1}/${total} (${name})`;
}

export function makeLayerRef(s: LayerSpec): LayerRef {
  const what = `layer ${layerLabel(s.index, s.total, s.name)}`;
  // An uncompressed blob's digest IS its diff_id; one hash then checks both.
  const diffId = s.diffId ?? (s.compression === "none" ? s.digest : null);
  return {
    index: s.index,
    digest: s.digest,
    diffId,
    size: s.size,
    compression: s.compression,
    label: s.name,
    ...(s.file !== undefined && s.compression === "none" ? { file: s.file } : {}),
    async open(o) {
      const raw = s.openRaw().pipeThrough(verifyTransform({ what, digest: s.digest, size: s.size, onMismatch: s.onMismatch }));
      const maxBytes = Math.min(s.maxLayerBytes, o?.maxBytes ?? Number.POSITIVE_INFINITY);
      const out = decompressStream(raw, s.compression, { maxBytes, what });
      // (An uncompressed blob whose digest differs from its diff_id fails one of the two checks.)
      if (diffId && diffId !== s.digest) {
        return out.pipeThrough(verifyTransform({ what, digest: diffId, digestName: "diff_id" }));
      }
      return out;
    },
  };
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
