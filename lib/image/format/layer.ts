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
  /** null: not computed yet (a local plain tar, `file` set): computed on first need, see settleDigest. */
  digest: string | null;
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
  if (s.digest === null && (s.file === undefined || s.compression !== "none")) throw new Error(`${what}: a lazy digest needs a local plain tar`);
  let known = s.digest;
  const file = s.compression === "none" ? s.file : undefined;
  // Hashing on demand blocks, but only a caller that asked for lazy digests and then reads one
  // before applying gets here.
  const digest = (): string => (known ??= `sha256:${sha256FileSync(s.file!)}`);
  // An uncompressed blob's digest IS its diff_id; one hash then checks both.
  const diffId = (): string | null => s.diffId ?? (s.compression === "none" ? digest() : null);
  return {
    index: s.index,
    get digest() {
      return digest();
    },
    get diffId() {
      return diffId();
    },
    size: s.size,
    compression: s.compression,
    label: s.name,
    ...(file !== undefined ? { file } : {}),
    ...(s.digest === null
      ? {
          settleDigest(d: string) {
            if (known !== null && known !== d) {
              throw new ThinimgError("input", `${what}: digest mismatch: expected ${known}, got ${d}`, {
                hint: "the file changed while being read; run again",
              });
            }
            known = d;
          },
        }
      : {}),
    async open(o) {
      const raw = s.openRaw().pipeThrough(verifyTransform({ what, digest: digest(), size: s.size, onMismatch: s.onMismatch }));
      const maxBytes = Math.min(s.maxLayerBytes, o?.maxBytes ?? Number.POSITIVE_INFINITY);
      const out = decompressStream(raw, s.compression, { maxBytes, what });
      // (An uncompressed blob whose digest differs from its diff_id fails one of the two checks.)
      const id = diffId();
      if (id && id !== digest()) {
        return out.pipeThrough(verifyTransform({ what, digest: id, digestName: "diff_id" }));
      }
      return out;
    },
  };
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
