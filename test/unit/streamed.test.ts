// Streamed S3 layer families (s3rver on 127.0.0.1): with lazy digests (what unpack asks for) the
// resolve downloads nothing, a layer's reader follows its download, the read-ahead is bounded, the
// digest is learnt by that one download, and a wrong digest or a short object fails the read.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../../lib/errors.ts";
import { BlobCache } from "../../lib/image/cache.ts";
import { resolveImage } from "../../lib/image/resolve.ts";
import { StreamedFamily } from "../../lib/image/source/streamed.ts";
import type { LayerRef, ResolveOptions } from "../../lib/image/types.ts";
import { compress, sampleLayer, sha256 } from "../helpers/images.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";

const root = mkdtempSync("/tmp/thinimg-streamed-test-");
let s3: TestS3;
let n = 0;
const fresh = (name: string) => join(root, `${++n}-${name}`);
const drain = async (l: LayerRef) => Buffer.from(await new Response(await l.open()).arrayBuffer());
const family = [1, 2, 3, 4].map((i) => sampleLayer(i, [{ path: `big${i}`, content: "x".repeat(300_000 + i) }]));
const opts = (o: Partial<ResolveOptions> = {}): ResolveOptions => ({ stateDir: fresh("state"), env: s3.env(false), lazyDigests: true, ...o });
const fullGets = (key: string) => s3.requests.filter((r) => r.method === "GET" && r.path === `/public/${key}` && r.range === null).length;

beforeAll(async () => {
  s3 = await startS3(["public"]);
  for (const [i, l] of family.entries()) await s3.put("public", `fam/${i + 1}.tar`, i === 1 ? compress(l, "gzip") : l);
});
afterAll(async () => {
  await s3?.close();
  rmSync(root, { recursive: true, force: true });
});

describe("streamed S3 layer family", () => {
  test("nothing is downloaded by the resolve; a read follows the download, with one layer of read-ahead", async () => {
    const before = s3.requests.length;
    const img = await resolveImage("s3://public/fam/", opts());
    // only the first bytes of each object (its compression) were read
    expect(s3.requests.slice(before).filter((r) => r.method === "GET" && r.path.startsWith("/public/fam/") && r.range === null)).toEqual([]);
    expect(img.layers.map((l) => l.compression)).toEqual(["none", "gzip", "none", "none"]);
    expect(img.layers.every((l) => l.lazy?.known() === null)).toBe(true);
    const g = (i: number) => fullGets(`fam/${i}.tar`);
    const gets0 = [1, 2, 3, 4].map(g);
    expect((await drain(img.layers[0]!)).equals(family[0]!)).toBe(true);
    // layer 1 and the one after it: not 3 and 4
    expect([1, 2, 3, 4].map(g)).toEqual([gets0[0]! + 1, gets0[1]! + 1, gets0[2]!, gets0[3]!]);
    expect(img.layers[0]!.digest).toBe(sha256(family[0]!));
    expect((await drain(img.layers[1]!)).equals(family[1]!)).toBe(true);
    expect(img.layers[1]!.digest).toBe(sha256(compress(family[1]!, "gzip")));
    expect(g(2)).toBe(gets0[1]! + 1); // fetched once, though read ahead
  });

  test("a re-run finds the downloaded blobs in the cache: known digests, nothing fetched", async () => {
    const o = opts();
    const img = await resolveImage("s3://public/fam/", o);
    for (const l of img.layers) await drain(l);
    const before = [1, 2, 3, 4].map((i) => fullGets(`fam/${i}.tar`));
    const again = await resolveImage("s3://public/fam/", o);
    expect(again.layers.map((l) => [l.lazy?.known(), l.digest])).toEqual(img.layers.map((l) => [l.digest, l.digest]));
    for (const [i, l] of again.layers.entries()) expect((await drain(l)).equals(family[i]!)).toBe(true);
    expect([1, 2, 3, 4].map((i) => fullGets(`fam/${i}.tar`))).toEqual(before);
  });

  test("a remembered digest that the streamed bytes do not match fails the read", async () => {
    const o = opts();
    const cache = new BlobCache(o.stateDir);
    const obj = (await resolveImage("s3://public/fam/", o)).layers[2]!;
    expect(obj.lazy).toBeDefined();
    // the digest index says these bytes (key, ETag, size) are something else
    cache.recordDigest(obj.lazy!.key, sha256("other bytes"), obj.size);
    const img = await resolveImage("s3://public/fam/", o);
    expect(img.layers[2]!.lazy?.known()).toBe(sha256("other bytes"));
    const e = await drain(img.layers[2]!).then(
      () => null,
      (x: unknown) => x,
    );
    expect(e).toBeInstanceOf(ThinimgError);
    expect((e as Error).message).toContain("digest mismatch");
    expect(cache.lookupDigest(obj.lazy!.key)).toBeNull(); // forgotten: the next run learns it again
  });

  test("the read-ahead is bounded: reading layer i starts i and i+1 only", async () => {
    const stateDir = fresh("state");
    const cache = new BlobCache(stateDir);
    const url = (i: number) => `${s3.endpoint}/public/fam/${i}.tar`;
    const fam = new StreamedFamily(
      cache,
      [1, 2, 3, 4].map((i) => ({ download: { url: url(i), what: `fam/${i}.tar`, key: `t:${url(i)}`, maxBytes: 1e9 } })),
      1,
    );
    expect(fam.started).toBe(0);
    const r = fam.open(0).getReader();
    expect(fam.started).toBe(2);
    while (!(await r.read()).done) {}
    expect(fam.started).toBe(2);
    await fam.fetched(1);
    expect(fam.started).toBe(2);
    fam.prefetch(2);
    expect(fam.started).toBe(4);
  });

  test("an object shorter than listed fails its streamed read (the download's error)", async () => {
    const stateDir = fresh("state");
    const cache = new BlobCache(stateDir);
    const url = `${s3.endpoint}/public/fam/1.tar`;
    const fam = new StreamedFamily(
      cache,
      [{ download: { url, what: "fam/1.tar", key: `t:${url}`, maxBytes: 1e9, pin: { etag: null, size: family[0]!.length + 10 } } }],
      1,
    );
    const e = await new Response(fam.open(0)).arrayBuffer().then(
      () => null,
      (x: unknown) => x,
    );
    expect(e).toBeInstanceOf(ThinimgError);
    expect((e as Error).message).toMatch(/truncated|changed since it was listed/);
  });
});
