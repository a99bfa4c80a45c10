// The content-addressed blob cache: temp file + rename, no partial blob ever visible, caps on bytes
// actually received, and the source index that lets re-runs skip downloads.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../../lib/errors.ts";
import { BlobCache } from "../../lib/image/cache.ts";
import { sha256 } from "../helpers/images.ts";

const dirs: string[] = [];
const stateDir = () => {
  const d = mkdtempSync("/tmp/thinimg-cache-test-");
  dirs.push(d);
  return d;
};
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function chunks(data: Uint8Array, size = 1000): ReadableStream<Uint8Array> {
  let off = 0;
  return new ReadableStream({
    pull(c) {
      if (off >= data.length) return c.close();
      c.enqueue(data.subarray(off, off + size));
      off += size;
    },
  });
}

const data = Buffer.from("x".repeat(50_000) + "end");

async function rejects(p: Promise<unknown>): Promise<ThinimgError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(ThinimgError);
    return e as ThinimgError;
  }
  throw new Error("expected a rejection");
}

describe("BlobCache.ingest", () => {
  test("stores under blobs/sha256/<hex> with the streamed digest; no temp file left", async () => {
    const sd = stateDir();
    const cache = new BlobCache(sd);
    const b = await cache.ingest(chunks(data), { what: "t", maxBytes: 1e6 });
    expect(b.digest).toBe(sha256(data));
    expect(b.size).toBe(data.length);
    expect(b.path).toBe(join(sd, "blobs", "sha256", sha256(data).slice(7)));
    expect(readFileSync(b.path).equals(data)).toBe(true);
    expect(cache.has(b.digest)).toBe(true);
    expect(readdirSync(join(sd, "blobs", "tmp"))).toEqual([]);
  });

  test("a digest mismatch leaves nothing behind", async () => {
    const sd = stateDir();
    const cache = new BlobCache(sd);
    const e = await rejects(cache.ingest(chunks(data), { what: "blob x", maxBytes: 1e6, digest: sha256("other") }));
    expect(e.message).toContain("blob x: digest mismatch");
    expect(readdirSync(join(sd, "blobs", "sha256"))).toEqual([]);
    expect(readdirSync(join(sd, "blobs", "tmp"))).toEqual([]);
  });

  test("the cap applies to bytes received and stops the read", async () => {
    const sd = stateDir();
    const cache = new BlobCache(sd);
    let pulled = 0;
    const endless = new ReadableStream<Uint8Array>({
      pull(c) {
        pulled += 4096;
        c.enqueue(new Uint8Array(4096));
      },
    });
    const e = await rejects(cache.ingest(endless, { what: "endless", maxBytes: 100_000 }));
    expect(e.kind).toBe("policy");
    expect(e.message).toContain("endless: larger than the 100000-byte limit");
    expect(pulled).toBeLessThan(200_000);
    expect(readdirSync(join(sd, "blobs", "sha256"))).toEqual([]);
    expect(readdirSync(join(sd, "blobs", "tmp"))).toEqual([]);
  });

  test("a pinned size: short or long bodies are refused", async () => {
    const cache = new BlobCache(stateDir());
    expect((await rejects(cache.ingest(chunks(data), { what: "s", maxBytes: 1e6, size: data.length + 1 }))).message).toContain("truncated");
    expect((await rejects(cache.ingest(chunks(data), { what: "s", maxBytes: 1e6, size: data.length - 1 }))).message).toContain("more than");
  });

  test("two concurrent ingests of the same content end with one blob", async () => {
    const sd = stateDir();
    const cache = new BlobCache(sd);
    const [a, b] = await Promise.all([
      cache.ingest(chunks(data, 100), { what: "a", maxBytes: 1e6 }),
      cache.ingest(chunks(data, 333), { what: "b", maxBytes: 1e6 }),
    ]);
    expect(a.digest).toBe(b.digest);
    expect(readdirSync(join(sd, "blobs", "sha256"))).toEqual([a.digest.slice(7)]);
    expect(readFileSync(a.path).equals(data)).toBe(true);
  });

  test("stale temp files from a crashed run are swept, fresh ones kept", () => {
    const sd = stateDir();
    new BlobCache(sd);
    const old = join(sd, "blobs", "tmp", "old");
    const fresh = join(sd, "blobs", "tmp", "fresh");
    writeFileSync(old, "partial");
    writeFileSync(fresh, "partial");
    const t = Date.now() / 1000 - 2 * 24 * 3600;
    utimesSync(old, t, t);
    new BlobCache(sd);
    expect(existsSync(old)).toBe(false);
    expect(existsSync(fresh)).toBe(true);
  });
});

describe("source index", () => {
  test("remembers key → digest while the blob exists; damaged records are ignored", async () => {
    const sd = stateDir();
    const cache = new BlobCache(sd);
    const b = await cache.ingest(chunks(data), { what: "t", maxBytes: 1e6 });
    cache.recordSource({ key: "http:u", etag: '"e1"', size: b.size, digest: b.digest });
    expect(cache.lookupSource("http:u")).toMatchObject({ etag: '"e1"', digest: b.digest, size: data.length });
    expect(cache.lookupSource("http:other")).toBeNull();
    cache.evict(b.digest);
    expect(cache.has(b.digest)).toBe(false);
    expect(cache.lookupSource("http:u")).toBeNull(); // blob gone → must download again
    const b2 = await cache.ingest(chunks(data), { what: "t", maxBytes: 1e6 });
    cache.recordSource({ key: "http:u", etag: null, size: b2.size, digest: b2.digest });
    const rec = readdirSync(join(sd, "blobs", "sources"))[0]!;
    writeFileSync(join(sd, "blobs", "sources", rec), "{not json");
    expect(cache.lookupSource("http:u")).toBeNull();
  });

  test("digests that are not sha256:<64 hex> never become paths", () => {
    const cache = new BlobCache(stateDir());
    expect(() => cache.path("sha256:../../etc/passwd")).toThrow(/invalid digest/);
    expect(() => cache.path(`sha512:${"a".repeat(128)}`)).toThrow(/unsupported digest algorithm "sha512"/);
  });
});
