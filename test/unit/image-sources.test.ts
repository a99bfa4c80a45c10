// Sources against real servers on 127.0.0.1: HTTP (Bun.serve, plus a raw socket server that lies)
// and S3 (npm s3rver in-process, anonymous and signed), and the SOURCE[:REF] syntax.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../../lib/errors.ts";
import { BlobCache } from "../../lib/image/cache.ts";
import { resolveImage } from "../../lib/image/resolve.ts";
import { download } from "../../lib/image/source/download.ts";
import { S3Bucket, s3Settings } from "../../lib/image/source/s3.ts";
import { parseSource } from "../../lib/image/source/spec.ts";
import type { LayerRef, ResolveOptions } from "../../lib/image/types.ts";
import { startHttp, startRawHttp } from "../helpers/http.ts";
import { compress, OciLayout, sampleLayer, sha256, withRef, writeDockerArchive } from "../helpers/images.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";

const root = mkdtempSync("/tmp/thinimg-sources-test-");
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const fresh = (name: string) => join(root, `${++n}-${name}`);
const readLayer = async (l: LayerRef) => Buffer.from(await new Response(await l.open()).arrayBuffer());

async function refused(p: Promise<unknown>): Promise<ThinimgError> {
  try {
    await p;
  } catch (e) {
    if (!(e instanceof ThinimgError)) throw e;
    expect(e.message).not.toContain("\n");
    return e;
  }
  throw new Error("expected a refusal");
}

const L = [1, 2, 3].map((i) => sampleLayer(i));

/** Leave a real partial download in the cache: an ingest whose stream breaks after `part`. */
async function interrupted(cache: BlobCache, key: string, part: Uint8Array, etag: string, size: number | null = null) {
  const broken = new ReadableStream<Uint8Array>({
    start(c) {
      c.enqueue(part);
    },
    pull(c) {
      c.error(new TypeError("network connection lost"));
    },
  });
  await expect(cache.ingest(broken, { what: "x", maxBytes: 1e9, keepPartial: { key, etag, size } })).rejects.toThrow("network connection lost");
}

describe("SOURCE[:REF] parsing", () => {
  test("local paths: the longest existing path wins, refs may contain ':' and '/'", () => {
    const d = fresh("img:with:colons.tar");
    writeFileSync(d, "x");
    expect(parseSource(d)).toEqual({ kind: "local", path: d, select: null });
    expect(parseSource(`${d}:docker.io/library/alpine:3.19`)).toEqual({ kind: "local", path: d, select: "docker.io/library/alpine:3.19" });
    expect(parseSource(d, "explicit")).toEqual({ kind: "local", path: d, select: "explicit" });
    expect(() => parseSource(`${root}/nope.tar:tag`)).toThrow("no such file or directory");
  });
  test("URLs and keys: the whole URL first, then each ':' split of the path, left to right", () => {
    expect(parseSource("https://h:8443/x/img.tar:app:1")).toEqual({
      kind: "http",
      candidates: [
        { url: "https://h:8443/x/img.tar:app:1", select: null },
        { url: "https://h:8443/x/img.tar", select: "app:1" },
        { url: "https://h:8443/x/img.tar:app", select: "1" },
      ],
    });
    expect(parseSource("http://h:8080/img.tar")).toEqual({ kind: "http", candidates: [{ url: "http://h:8080/img.tar", select: null }] });
    expect(parseSource("http://h/i:x?s=a:b")).toEqual({ kind: "http", candidates: [{ url: "http://h/i:x?s=a:b", select: null }] });
    expect(parseSource("s3://bkt/p/")).toEqual({ kind: "s3", bucket: "bkt", prefix: true, candidates: [{ key: "p/", select: null }] });
    expect(parseSource("s3://bkt/k.tar:docker.io/x/y:2")).toMatchObject({
      prefix: false,
      candidates: [{ key: "k.tar:docker.io/x/y:2" }, { key: "k.tar", select: "docker.io/x/y:2" }, { key: "k.tar:docker.io/x/y", select: "2" }],
    });
    expect(() => parseSource("ftp://h/x")).toThrow("unsupported source scheme");
    expect(() => parseSource("s3://a/x")).toThrow("not an S3 bucket name");
    expect(parseSource("s3://bkt/k", "t")).toMatchObject({ candidates: [{ key: "k", select: "t" }] });
  });
  test("S3 settings from the standard environment", () => {
    expect(s3Settings({})).toEqual({ endpoint: null, region: null, accessKeyId: null, secretAccessKey: null, sessionToken: null });
    expect(
      s3Settings({
        AWS_ENDPOINT_URL: "http://127.0.0.1:9000/",
        AWS_REGION: "eu-west-1",
        AWS_ACCESS_KEY_ID: "k",
        AWS_SECRET_ACCESS_KEY: "s",
        AWS_SESSION_TOKEN: "t",
      }),
    ).toEqual({ endpoint: "http://127.0.0.1:9000", region: "eu-west-1", accessKeyId: "k", secretAccessKey: "s", sessionToken: "t" });
    expect(s3Settings({ S3_ENDPOINT: "https://s3.example" }).endpoint).toBe("https://s3.example");
    expect(() => s3Settings({ AWS_ACCESS_KEY_ID: "k" })).toThrow("S3 credentials are incomplete");
    expect(() => s3Settings({ AWS_ENDPOINT_URL: "localhost:9000" })).toThrow("is not an http(s) URL");
  });
});

describe("HTTP", () => {
  const archive = fresh("served.tar");
  writeDockerArchive(archive, [
    { tags: ["app:1"], layers: [L[0]!, compress(L[1]!, "gzip")] },
    { tags: ["other:2"], layers: [L[2]!] },
  ]);
  const served = readFileSync(archive);
  const big = new Uint8Array(3 * 1024 * 1024);
  const http = startHttp({
    "/img.tar": { data: served },
    "/noetag.tar": { data: served, etag: null },
    "/endless": { data: L[0]!, chunked: true, extraBytes: 200_000_000 },
    "/big": { data: big },
  });
  const raw = startRawHttp({
    "/short": { head: ["HTTP/1.1 200 OK", "Content-Length: 100000", 'ETag: "s"'], body: served.subarray(0, 5000) },
    "/huge": { head: ["HTTP/1.1 200 OK", "Content-Length: 999999999999"], body: new Uint8Array(10) },
  });
  afterAll(async () => {
    await http.close();
    raw.close();
  });

  test("fetch + select by URL:TAG; a re-run revalidates (304) and downloads nothing", async () => {
    const stateDir = fresh("state");
    const img = await resolveImage(`${http.url("/img.tar")}:app:1`, { stateDir });
    expect(img.format).toBe("docker-archive");
    expect(img.name).toBe("app:1");
    expect((await readLayer(img.layers[1]!)).equals(L[1]!)).toBe(true);
    expect(new BlobCache(stateDir).has(sha256(served))).toBe(true);
    const again = await resolveImage(http.url("/img.tar"), { stateDir, select: "other:2" });
    expect((await readLayer(again.layers[0]!)).equals(L[2]!)).toBe(true);
    // the whole "img.tar:app:1" was tried first (404), then "img.tar" with ref "app:1"
    expect(http.requests.filter((r) => r.path === "/img.tar:app:1").map((r) => r.status)).toEqual([404]);
    const gets = http.requests.filter((r) => r.path === "/img.tar");
    expect(gets.filter((r) => r.status === 200).length).toBe(1);
    expect(gets.filter((r) => r.status === 304).length).toBe(1);
    expect(gets.at(-1)!.headers["if-none-match"]).toBeTruthy();
  });

  test("without an ETag the object is fetched again, but stored once", async () => {
    const stateDir = fresh("state");
    await resolveImage(`${http.url("/noetag.tar")}:app:1`, { stateDir });
    await resolveImage(`${http.url("/noetag.tar")}:app:1`, { stateDir });
    expect(http.requests.filter((r) => r.path === "/noetag.tar" && r.status === 200).length).toBe(2);
  });

  test("404 is one line with the status", async () => {
    const e = await refused(resolveImage(http.url("/missing.tar"), { stateDir: fresh("state") }));
    expect(e.message).toBe(`${http.url("/missing.tar")}: HTTP 404 Not Found`);
    expect(e.hint).toContain("check the URL");
  });

  test("an endless body stops at the cap; the server is not drained", async () => {
    const stateDir = fresh("state");
    const e = await refused(resolveImage(http.url("/endless"), { stateDir, maxBlobBytes: 1024 * 1024 }));
    expect(e.kind).toBe("policy");
    expect(e.message).toContain("larger than the 1048576-byte limit");
    await Bun.sleep(100);
    expect(http.sent.get("/endless")!).toBeLessThan(50_000_000);
    expect(new BlobCache(stateDir).has(sha256(L[0]!))).toBe(false);
  });

  test("a Content-Length above the cap is refused before reading the body", async () => {
    const e = await refused(resolveImage(http.url("/big"), { stateDir: fresh("state"), maxBlobBytes: 1024 * 1024 }));
    expect(e.kind).toBe("policy");
    const e2 = await refused(resolveImage(raw.url("/huge"), { stateDir: fresh("state") }));
    expect(e2.kind).toBe("policy");
  });

  test("transient failures (503, 429) are retried with backoff; a 404 is not", async () => {
    const blob = sampleLayer(8);
    const answers = [503, 429, 200];
    let calls404 = 0;
    const srv = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(req) {
        if (new URL(req.url).pathname === "/gone.tar") {
          calls404++;
          return new Response("no\n", { status: 404 });
        }
        const status = answers.shift() ?? 200;
        return status === 200 ? new Response(blob, { headers: { etag: '"r1"' } }) : new Response("busy\n", { status });
      },
    });
    try {
      const cache = new BlobCache(fresh("state"));
      const url = `http://127.0.0.1:${srv.port}`;
      const d = await download(cache, {
        url: `${url}/flaky.tar`,
        what: "flaky.tar",
        key: `http:${url}/flaky.tar`,
        maxBytes: 1e9,
        retry: { attempts: 4, baseDelayMs: 20 },
      });
      expect(d.digest).toBe(sha256(blob));
      expect(answers).toEqual([]); // 503, 429, then the object
      const e = await refused(
        download(cache, { url: `${url}/gone.tar`, what: "gone.tar", key: `http:${url}/gone.tar`, maxBytes: 1e9, retry: { attempts: 4, baseDelayMs: 20 } }),
      );
      expect(e.message).toBe("gone.tar: HTTP 404 Not Found");
      expect(calls404).toBe(1);
      // out of attempts: the last transient failure is the error
      answers.push(503, 503);
      const e2 = await refused(
        download(cache, { url: `${url}/again.tar`, what: "again.tar", key: `http:${url}/again.tar`, maxBytes: 1e9, retry: { attempts: 2, baseDelayMs: 20 } }),
      );
      expect(e2.message).toBe("again.tar: HTTP 503 Service Unavailable");
    } finally {
      await srv.stop(true);
    }
  });

  test("an interrupted download resumes with Range/If-Range instead of starting over", async () => {
    const blob = sampleLayer(7, [{ path: "big", content: new Uint8Array(600_000).fill(9) }]);
    const cut = 250_000;
    let calls = 0;
    const srv = startRawHttp({
      "/layer.tar": (req) => {
        calls++;
        const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
        if (m && req.headers["if-range"] === '"v1"') {
          const from = Number(m[1]);
          return {
            head: [
              "HTTP/1.1 206 Partial Content",
              `Content-Length: ${blob.length - from}`,
              `Content-Range: bytes ${from}-${blob.length - 1}/${blob.length}`,
              'ETag: "v1"',
            ],
            body: blob.subarray(from),
          };
        }
        // first transfer: announce everything, send 250 kB, hang up
        return { head: ["HTTP/1.1 200 OK", `Content-Length: ${blob.length}`, 'ETag: "v1"'], body: blob.subarray(0, cut) };
      },
    });
    try {
      const stateDir = fresh("state");
      // the dropped transfer is retried at once (with backoff) and resumes where it stopped
      const img = await resolveImage(srv.url("/layer.tar"), { stateDir });
      expect(img.layers[0]!.digest).toBe(sha256(blob));
      expect((await readLayer(img.layers[0]!)).equals(blob)).toBe(true);
      expect(calls).toBe(2);
      expect(srv.requests[1]!.headers.range).toBe(`bytes=${cut}-`);
      expect(readdirSync(join(stateDir, "blobs", "partial"))).toEqual([]);
      expect(readdirSync(join(stateDir, "blobs", "tmp"))).toEqual([]);
    } finally {
      srv.close();
    }
  });

  test("a partial download of an object that changed is discarded (If-Range → 200)", async () => {
    const stateDir = fresh("state");
    const cache = new BlobCache(stateDir);
    const key = `http:${http.url("/img.tar")}`;
    await interrupted(cache, key, served.subarray(0, 1000), '"stale-etag"');
    const img = await resolveImage(`${http.url("/img.tar")}:app:1`, { stateDir });
    expect((await readLayer(img.layers[0]!)).equals(L[0]!)).toBe(true);
    const last = http.requests.filter((r) => r.path === "/img.tar").at(-1)!;
    expect(last.headers.range).toBe("bytes=1000-");
    expect(last.headers["if-range"]).toBe('"stale-etag"');
    expect(last.status).toBe(200);
    expect(readdirSync(join(stateDir, "blobs", "tmp"))).toEqual([]);
  });

  test("a body shorter than its Content-Length is an error; only a resumable partial is kept", async () => {
    const stateDir = fresh("state");
    const e = await refused(resolveImage(raw.url("/short"), { stateDir, fetchRetry: { attempts: 2, baseDelayMs: 10 } }));
    expect(e.message).toMatch(/\/short: (truncated: got 5000 of 100000 bytes|cannot fetch: connection closed)/);
    const cache = new BlobCache(stateDir);
    expect(cache.lookupSource(`http:${raw.url("/short")}`)).toBeNull();
    expect(readdirSync(join(stateDir, "blobs", "sha256"))).toEqual([]);
    expect(readdirSync(join(stateDir, "blobs", "partial")).length).toBe(2); // data + meta, for a resume
  });
});

describe("S3 (s3rver on 127.0.0.1)", () => {
  let s3: TestS3;
  const family = Array.from({ length: 12 }, (_, i) => sampleLayer(i + 1));
  const kinds = ["none", "gzip", "zstd"] as const;
  const archive = fresh("s3img.tar");
  beforeAll(async () => {
    s3 = await startS3(["public", "private"]);
    for (const [i, l] of family.entries()) await s3.put("public", `fam/${i + 1}.tar`, compress(l, kinds[i % 3]!));
    await s3.put("public", "fam/README.md", "layers of a test image");
    await s3.put("public", "fam/sub/1.tar", "not part of the family");
    await s3.put("public", "gap/1.tar", L[0]!);
    await s3.put("public", "gap/3.tar", L[1]!);
    writeDockerArchive(archive, [
      { tags: ["app:1"], layers: [L[0]!, L[1]!] },
      { tags: ["app:2"], layers: [L[2]!] },
    ]);
    await s3.put("private", "images/app.tar", readFileSync(archive));
    const layout = new OciLayout();
    const a = layout.addImage({ layers: [compress(L[0]!, "gzip")], platform: { os: "linux", architecture: "amd64" } });
    const b = layout.addImage({ layers: [L[1]!], platform: { os: "linux", architecture: "arm64" } });
    const ociTar = fresh("oci.tar");
    layout.writeTar(ociTar, [withRef(layout.addIndex([b.manifest, a.manifest]), "v1")]);
    await s3.put("public", "oci/img.tar", readFileSync(ociTar));
  });
  afterAll(async () => {
    await s3?.close();
  });
  const opts = (signed: boolean, o: Partial<ResolveOptions> = {}): ResolveOptions => ({
    stateDir: fresh("state"),
    env: s3.env(signed),
    ...o,
  });

  for (const signed of [false, true]) {
    test(`prefix layer family 1..12.tar in numeric order (${signed ? "signed" : "anonymous"})`, async () => {
      const before = s3.requests.length;
      const img = await resolveImage("s3://public/fam/", opts(signed));
      expect(img.format).toBe("layer-family");
      expect(img.source).toBe("s3://public/fam/");
      expect(img.layers.map((l) => l.label)).toEqual(family.map((_, i) => `${i + 1}.tar`));
      expect(img.layers.map((l) => l.compression)).toEqual(family.map((_, i) => kinds[i % 3]!));
      for (const [i, l] of img.layers.entries()) expect((await readLayer(l)).equals(family[i]!)).toBe(true);
      const mine = s3.requests.slice(before);
      expect(mine.length).toBeGreaterThan(12);
      // anonymous means unsigned requests; signed means every request carries a signature
      expect(mine.every((r) => r.signed === signed)).toBe(true);
    });
  }

  test("paginated listings: every key once, following continuation tokens", async () => {
    // s3rver's own pagination is broken (unsorted pages, repeated and skipped keys), so this uses a
    // minimal ListObjectsV2 server on 127.0.0.1 that pages like S3 does (sorted, opaque tokens).
    const keys = [...family.map((_, i) => `fam/${i + 1}.tar`), "fam/README.md", "fam/sub/1.tar"].sort();
    const seen: string[] = [];
    const lister = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(req) {
        const q = new URL(req.url).searchParams;
        seen.push(q.get("continuation-token") ?? "");
        const prefix = q.get("prefix") ?? "";
        const max = Number(q.get("max-keys"));
        const after = q.get("continuation-token") ? atob(q.get("continuation-token")!) : "";
        const direct = keys.filter((k) => k.startsWith(prefix) && !k.slice(prefix.length).includes("/") && k > after);
        const page = direct.slice(0, max);
        const more = direct.length > max;
        const xml = `<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bkt</Name><IsTruncated>${more}</IsTruncated>${page
          .map((k) => `<Contents><Key>${k}</Key><ETag>&quot;${k.length}&quot;</ETag><Size>${k.length}</Size></Contents>`)
          .join("")}${more ? `<NextContinuationToken>${btoa(page.at(-1)!)}</NextContinuationToken>` : ""}</ListBucketResult>`;
        return new Response(xml, { headers: { "content-type": "application/xml" } });
      },
    });
    try {
      const bucket = new S3Bucket("bkt", s3Settings({ AWS_ENDPOINT_URL: `http://127.0.0.1:${lister.port}` }));
      const objs = await bucket.list("fam/", undefined, 5);
      expect(objs.map((o) => o.key).sort()).toEqual(keys.filter((k) => !k.includes("sub/")));
      expect(objs.find((o) => o.key === "fam/10.tar")).toEqual({ key: "fam/10.tar", etag: '"10"', size: 10 });
      expect(seen.length).toBe(3);
      expect(seen[0]).toBe("");
      expect(seen[1]).not.toBe("");
    } finally {
      await lister.stop(true);
    }
    // and against s3rver (one page), signed and anonymous listings agree
    const a = await new S3Bucket("public", s3Settings(s3.env(false))).list("fam/");
    const b = await new S3Bucket("public", s3Settings(s3.env(true))).list("fam/");
    expect(a.map((o) => `${o.key} ${o.etag} ${o.size}`).sort()).toEqual(b.map((o) => `${o.key} ${o.etag} ${o.size}`).sort());
    expect(a.length).toBe(13);
  });

  test("a re-run downloads nothing: ETag + size match the cache index", async () => {
    const o = opts(false);
    await resolveImage("s3://public/fam/", o);
    const gets = () => family.reduce((sum, _, i) => sum + s3.gets("public", `fam/${i + 1}.tar`), 0);
    const before = gets();
    const img = await resolveImage("s3://public/fam/", o);
    expect(gets()).toBe(before);
    expect((await readLayer(img.layers[9]!)).equals(family[9]!)).toBe(true);
  });

  test("signed single object with :TAG selection; wrong credentials are one line", async () => {
    const img = await resolveImage("s3://private/images/app.tar:app:2", opts(true));
    expect(img.format).toBe("docker-archive");
    expect(img.name).toBe("app:2");
    expect((await readLayer(img.layers[0]!)).equals(L[2]!)).toBe(true);
    const e = await refused(
      resolveImage("s3://private/images/app.tar:app:2", {
        stateDir: fresh("state"),
        env: { ...s3.env(true), AWS_ACCESS_KEY_ID: "WRONG" },
      }),
    );
    expect(e.message).toContain("s3://private/images/app.tar");
    expect(e.message).toContain("403");
  });

  test("OCI tar from S3, multi-arch picks linux/amd64", async () => {
    const img = await resolveImage("s3://public/oci/img.tar:v1", opts(false));
    expect(img.platform).toBe("linux/amd64");
    expect((await readLayer(img.layers[0]!)).equals(L[0]!)).toBe(true);
  });

  test("a partial S3 download resumes with a Range GET pinned by If-Match", async () => {
    const blob = Buffer.concat([sampleLayer(9), Buffer.alloc(200_000, 3)]);
    await s3.put("public", "resume/1.tar", blob);
    const o = opts(false);
    const bucket = new S3Bucket("public", s3Settings(s3.env(false)));
    const [obj] = await bucket.list("resume/");
    await interrupted(new BlobCache(o.stateDir), bucket.cacheKey("resume/1.tar"), blob.subarray(0, 70_000), obj!.etag!, obj!.size);
    const img = await resolveImage("s3://public/resume/", o);
    expect(img.layers[0]!.digest).toBe(sha256(blob));
    const gets = s3.requests.filter((r) => r.method === "GET" && r.path === "/public/resume/1.tar");
    expect(gets.map((r) => r.range)).toEqual(["bytes=70000-"]);
  });

  test("an object replaced after it was listed is refused, not mixed in", async () => {
    await s3.put("public", "moving/1.tar", L[0]!);
    const bucket = new S3Bucket("public", s3Settings(s3.env(false)));
    const [listed] = await bucket.list("moving/");
    await s3.put("public", "moving/1.tar", L[1]!); // same size, new content → new ETag
    const cache = new BlobCache(fresh("state"));
    const e = await refused(
      download(cache, {
        url: bucket.url("moving/1.tar", "GET"),
        what: bucket.uri("moving/1.tar"),
        key: bucket.cacheKey("moving/1.tar"),
        maxBytes: 1e9,
        pin: { etag: listed!.etag, size: listed!.size },
      }),
    );
    expect(e.message).toContain("s3://public/moving/1.tar: changed since it was listed (ETag");
  });

  test("missing key, empty prefix, gaps: one line each", async () => {
    const e1 = await refused(resolveImage("s3://public/nope.tar", opts(false)));
    expect(e1.message).toBe("s3://public/nope.tar: no such object");
    expect(e1.hint).toContain("end the prefix with /");
    const e2 = await refused(resolveImage("s3://public/empty/", opts(false)));
    expect(e2.message).toContain("no objects under this prefix");
    const e3 = await refused(resolveImage("s3://public/gap/", opts(true)));
    expect(e3.message).toContain("layer 2.tar is missing");
    const e4 = await refused(resolveImage("s3://nobucket/x/", opts(true)));
    expect(e4.message).toMatch(/s3:\/\/nobucket\/x\/: (no such bucket|listing failed)/);
  });

  test("the size cap applies to S3 objects", async () => {
    const e = await refused(resolveImage("s3://private/images/app.tar:app:1", opts(true, { maxBlobBytes: 1000 })));
    expect(e.kind).toBe("policy");
  });
});
