// Compression detection by magic bytes and streaming decompression with its bomb guard.
import { describe, expect, test } from "bun:test";
import { gzipSync, zstdCompressSync } from "node:zlib";
import { ThinimgError } from "../../lib/errors.ts";
import { decompressStream, detectCompression, unsupportedCompression } from "../../lib/image/compression.ts";

const streamOf = (data: Uint8Array, chunk = 64 * 1024) =>
  new ReadableStream<Uint8Array>({
    start(c) {
      for (let i = 0; i < data.length; i += chunk) c.enqueue(data.subarray(i, i + chunk));
      c.close();
    },
  });

async function drain(s: ReadableStream<Uint8Array>): Promise<{ bytes: Buffer; error: unknown }> {
  const parts: Uint8Array[] = [];
  try {
    for await (const c of s) parts.push(c);
    return { bytes: Buffer.concat(parts), error: null };
  } catch (e) {
    return { bytes: Buffer.concat(parts), error: e };
  }
}

// Compressible but not trivial: a few MB of text with varying numbers.
const sample = Buffer.from(Array.from({ length: 120_000 }, (_, i) => `line ${i} ${(i * 7919) % 104729}\n`).join(""));

describe("detectCompression", () => {
  test("recognises gzip, zstd and plain by content", () => {
    expect(detectCompression(gzipSync(sample).subarray(0, 6))).toBe("gzip");
    expect(detectCompression(zstdCompressSync(sample).subarray(0, 6))).toBe("zstd");
    expect(detectCompression(sample.subarray(0, 6))).toBe("none");
    expect(detectCompression(new Uint8Array(0))).toBe("none");
  });
  test("names formats it recognises but refuses", () => {
    expect(unsupportedCompression(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))).toBe("xz");
    expect(unsupportedCompression(Buffer.from("BZh91AY"))).toBe("bzip2");
    expect(unsupportedCompression(sample.subarray(0, 6))).toBeNull();
  });
});

describe("decompressStream", () => {
  for (const kind of ["gzip", "zstd"] as const) {
    test(`${kind}: round trip is byte-identical`, async () => {
      const packed = kind === "gzip" ? gzipSync(sample) : zstdCompressSync(sample);
      const r = await drain(decompressStream(streamOf(packed), kind, { maxBytes: sample.length }));
      expect(r.error).toBeNull();
      expect(r.bytes.equals(sample)).toBe(true);
    });

    test(`${kind}: a bomb stops at the cap, not at the end`, async () => {
      const zeros = new Uint8Array(64 * 1024 * 1024); // 64 MiB → tens of KiB compressed
      const bomb = kind === "gzip" ? gzipSync(zeros, { level: 9 }) : zstdCompressSync(zeros);
      expect(bomb.length).toBeLessThan(256 * 1024);
      const cap = 4 * 1024 * 1024;
      let pulled = 0;
      const src = new ReadableStream<Uint8Array>({
        pull(c) {
          if (pulled >= bomb.length) return c.close();
          const part = bomb.subarray(pulled, pulled + 256);
          pulled += part.length;
          c.enqueue(part);
        },
      });
      const r = await drain(decompressStream(src, kind, { maxBytes: cap, what: "layer 1/1 (bomb)" }));
      // it stopped reading the input early: most of the bomb was never decompressed
      expect(pulled).toBeLessThan(bomb.length / 2);
      expect(r.error).toBeInstanceOf(ThinimgError);
      expect((r.error as ThinimgError).kind).toBe("policy");
      expect((r.error as ThinimgError).message).toMatch(/^layer 1\/1 \(bomb\): decompressed size exceeds the 4\.0 MiB limit/);
      expect(r.bytes.length).toBeLessThanOrEqual(cap);
    });

    test(`${kind}: corrupt data is an input error naming the stream`, async () => {
      const packed = Buffer.from(kind === "gzip" ? gzipSync(sample) : zstdCompressSync(sample));
      packed.fill(0x55, 20, 400);
      const r = await drain(decompressStream(streamOf(packed), kind, { maxBytes: 1e9, what: "layer 2/3 (x)" }));
      expect(r.error).toBeInstanceOf(ThinimgError);
      expect((r.error as ThinimgError).kind).toBe("input");
      expect((r.error as ThinimgError).message).toContain(`layer 2/3 (x): corrupt ${kind} data`);
    });

    test(`${kind}: truncated data is an error, not a short layer`, async () => {
      const packed = kind === "gzip" ? gzipSync(sample) : zstdCompressSync(sample);
      const r = await drain(decompressStream(streamOf(packed.subarray(0, packed.length - 50)), kind, { maxBytes: 1e9 }));
      expect(r.error).toBeInstanceOf(ThinimgError);
      expect((r.error as ThinimgError).message).toContain(`corrupt ${kind} data`);
    });
  }

  test("an upstream ThinimgError passes through decompression unchanged", async () => {
    const packed = gzipSync(sample);
    const failing = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(packed.subarray(0, 1000));
        c.error(new ThinimgError("input", "layer 1/1: digest mismatch"));
      },
    });
    const r = await drain(decompressStream(failing, "gzip", { maxBytes: 1e9 }));
    expect((r.error as ThinimgError).message).toBe("layer 1/1: digest mismatch");
  });

  test("plain streams are capped too", async () => {
    const r = await drain(decompressStream(streamOf(sample), "none", { maxBytes: 1000 }));
    expect((r.error as ThinimgError).kind).toBe("policy");
  });
});
