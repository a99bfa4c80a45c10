// Small stream building blocks: byte caps, digest verification at EOF, error mapping. Every check
// runs on the bytes actually flowing, never on what a header or a manifest claims.
import { ThinimgError } from "../errors.ts";
import { formatBytes } from "../util/units.ts";

export interface VerifyOptions {
  /** What is being read, for messages ("layer 2/3 (sha256:…)"). */
  what: string;
  /** Expected sha256:… of the bytes; checked at EOF. */
  digest?: string | null;
  /** Expected exact byte count; checked as bytes arrive and at EOF. */
  size?: number | null;
  /** Called once with the actual digest when the stream ends cleanly (after checks). */
  onDigest?(digest: string, size: number): void;
  /** Called on mismatch before the error is raised (e.g. to evict a bad cache entry). */
  onMismatch?(): void;
  /** Name the digest in messages ("digest", "diff_id"). */
  digestName?: string;
}

/** A pass-through that hashes and counts, and errors at EOF when digest or size do not match. */
export function verifyTransform(o: VerifyOptions): TransformStream<Uint8Array, Uint8Array> {
  const h = new Bun.CryptoHasher("sha256");
  let n = 0;
  const name = o.digestName ?? "digest";
  return new TransformStream({
    transform(chunk, controller) {
      n += chunk.length;
      if (o.size != null && n > o.size) {
        o.onMismatch?.();
        controller.error(
          new ThinimgError("input", `${o.what}: more bytes than the ${o.size} declared`, {
            hint: "the blob is corrupt or changed while being read; fetch the image again",
          }),
        );
        return;
      }
      h.update(chunk);
      controller.enqueue(chunk);
    },
    flush(controller) {
      if (o.size != null && n !== o.size) {
        o.onMismatch?.();
        controller.error(
          new ThinimgError("input", `${o.what}: truncated: ${n} of ${o.size} bytes`, {
            hint: "the blob is incomplete or changed while being read; fetch the image again",
          }),
        );
        return;
      }
      const got = `sha256:${h.digest("hex")}`;
      if (o.digest && got !== o.digest) {
        o.onMismatch?.();
        controller.error(
          new ThinimgError("input", `${o.what}: ${name} mismatch: expected ${o.digest}, got ${got}`, {
            hint: "the image is corrupt or was tampered with; do not use it",
          }),
        );
        return;
      }
      o.onDigest?.(got, n);
    },
  });
}

/** Errors (policy) once more than maxBytes have passed: stops bombs and lying servers mid-stream. */
export function capTransform(
  maxBytes: number,
  what: string,
  kind = "size",
  hint = "raise the limit if the image is legitimate",
): TransformStream<Uint8Array, Uint8Array> {
  let n = 0;
  return new TransformStream({
    transform(chunk, controller) {
      n += chunk.length;
      if (n > maxBytes) {
        controller.error(
          new ThinimgError("policy", `${what}: ${kind} exceeds the ${formatBytes(maxBytes)} limit (${maxBytes} bytes)`, {
            hint,
          }),
        );
        return;
      }
      controller.enqueue(chunk);
    },
  });
}

/**
 * Re-raise a stream's errors through `map` (e.g. turn a zlib TypeError into a ThinimgError naming
 * the layer). ThinimgErrors pass through unchanged.
 */
export function mapStreamErrors(src: ReadableStream<Uint8Array>, map: (e: unknown) => unknown): ReadableStream<Uint8Array> {
  const reader = src.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const r = await reader.read();
        if (r.done) controller.close();
        else controller.enqueue(r.value);
      } catch (e) {
        controller.error(e instanceof ThinimgError ? e : map(e));
      }
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
}

/** Read a whole (small) stream, refusing more than maxBytes. */
export async function readAllCapped(stream: ReadableStream<Uint8Array>, maxBytes: number, what: string): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let n = 0;
  for await (const chunk of stream) {
    n += chunk.length;
    if (n > maxBytes) {
      throw new ThinimgError("policy", `${what}: larger than ${formatBytes(maxBytes)}`, {
        hint: "metadata files (manifests, indexes, configs) must be small; the archive looks hostile",
      });
    }
    parts.push(chunk);
  }
  const out = new Uint8Array(n);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}
