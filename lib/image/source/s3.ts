// S3 access. Settings come from the standard environment: endpoint AWS_ENDPOINT_URL_S3 /
// AWS_ENDPOINT_URL / S3_ENDPOINT / AWS_ENDPOINT, region AWS_REGION / AWS_DEFAULT_REGION / S3_REGION,
// credentials AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or S3_* equivalents.
// No credentials → anonymous (public buckets such as flyio-platform-hiring-challenge).
//
// Bun.S3Client signs everything and refuses to run without credentials (ERR_S3_MISSING_CREDENTIALS,
// oven-sh/bun#19566: no unsigned requests), so:
//  - listing: Bun.S3Client.list() when signed; a plain ListObjectsV2 GET parsed with Bun.XML when
//    anonymous;
//  - reading: a URL — presigned by Bun.S3Client when signed, the plain object URL when anonymous —
//    fetched with fetch(). One streaming path for both, and unlike S3File.stream() it lets us send
//    If-Match and see the response ETag, which is how the listed ETag is pinned for the read.
// Custom endpoints (MinIO, R2, s3rver…) use path-style URLs; AWS uses virtual-hosted style.
import { S3Client } from "bun";
import * as v from "valibot";
import { errorMessage, ThinimgError } from "../../errors.ts";
import { errorBody, httpError, networkError } from "./download.ts";

type Env = Record<string, string | undefined>;

export interface S3Settings {
  endpoint: string | null;
  region: string | null;
  accessKeyId: string | null;
  secretAccessKey: string | null;
  sessionToken: string | null;
}

export interface S3Object {
  key: string;
  etag: string | null;
  size: number;
}

const first = (env: Env, ...names: string[]) => {
  for (const n of names) {
    const val = env[n];
    if (val !== undefined && val.trim() !== "") return val.trim();
  }
  return null;
};

export function s3Settings(env: Env = process.env): S3Settings {
  const endpoint = first(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT", "AWS_ENDPOINT");
  if (endpoint && !/^https?:\/\/[^/]+/i.test(endpoint)) {
    throw new ThinimgError("usage", `S3 endpoint "${endpoint}" is not an http(s) URL`, {
      hint: "set AWS_ENDPOINT_URL to e.g. https://s3.example.com or http://127.0.0.1:9000",
    });
  }
  const accessKeyId = first(env, "AWS_ACCESS_KEY_ID", "S3_ACCESS_KEY_ID");
  const secretAccessKey = first(env, "AWS_SECRET_ACCESS_KEY", "S3_SECRET_ACCESS_KEY");
  if (!!accessKeyId !== !!secretAccessKey) {
    throw new ThinimgError("usage", "S3 credentials are incomplete", {
      hint: "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither for anonymous access",
    });
  }
  return {
    endpoint: endpoint ? endpoint.replace(/\/+$/, "") : null,
    region: first(env, "AWS_REGION", "AWS_DEFAULT_REGION", "S3_REGION"),
    accessKeyId,
    secretAccessKey,
    sessionToken: first(env, "AWS_SESSION_TOKEN", "S3_SESSION_TOKEN"),
  };
}

const encodeKey = (key: string) => key.split("/").map(encodeURIComponent).join("/");

const ListResult = v.looseObject({
  ListBucketResult: v.looseObject({
    IsTruncated: v.optional(v.string()),
    NextContinuationToken: v.optional(v.string()),
    Contents: v.optional(
      v.union([
        v.looseObject({ Key: v.string(), ETag: v.optional(v.string()), Size: v.string() }),
        v.array(v.looseObject({ Key: v.string(), ETag: v.optional(v.string()), Size: v.string() })),
      ]),
    ),
  }),
});

const MAX_LIST_PAGES = 100;

export class S3Bucket {
  readonly anonymous: boolean;
  private readonly client: S3Client | null;

  constructor(
    readonly bucket: string,
    readonly settings: S3Settings,
  ) {
    this.anonymous = !settings.accessKeyId;
    this.client = this.anonymous
      ? null
      : new S3Client({
          bucket,
          accessKeyId: settings.accessKeyId!,
          secretAccessKey: settings.secretAccessKey!,
          ...(settings.sessionToken ? { sessionToken: settings.sessionToken } : {}),
          region: settings.region ?? "us-east-1",
          ...(settings.endpoint ? { endpoint: settings.endpoint } : { virtualHostedStyle: true }),
        });
  }

  /** Identity for messages and the cache index (no credentials). */
  uri(key: string): string {
    return `s3://${this.bucket}/${key}`;
  }

  cacheKey(key: string): string {
    return `s3:${this.settings.endpoint ?? "aws"}/${this.bucket}/${key}`;
  }

  /** Unsigned URL of the bucket root (no trailing slash) or of a key. */
  private plainUrl(key?: string): string {
    const { endpoint, region } = this.settings;
    let base: string;
    if (endpoint) base = `${endpoint}/${encodeURIComponent(this.bucket)}`;
    else if (/^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/.test(this.bucket)) {
      // Virtual-hosted; without a region the global name routes to the bucket's region.
      base = `https://${this.bucket}.s3${region ? `.${region}` : ""}.amazonaws.com`;
    } else base = `https://s3.${region ?? "us-east-1"}.amazonaws.com/${encodeURIComponent(this.bucket)}`;
    return key === undefined ? base : `${base}/${encodeKey(key)}`;
  }

  /** A URL a plain fetch can use for GET/HEAD: presigned when we have credentials. */
  url(key: string, method: "GET" | "HEAD"): string {
    if (!this.client) return this.plainUrl(key);
    return this.client.presign(key, { method, expiresIn: 3600 });
  }

  /** HEAD an object: its ETag and size, or null when there is no such key. */
  async head(key: string, signal?: AbortSignal): Promise<S3Object | null> {
    const what = this.uri(key);
    let res: Response;
    try {
      res = await fetch(this.url(key, "HEAD"), { method: "HEAD", signal });
    } catch (e) {
      throw networkError(what, e);
    }
    if (res.status === 404) return null;
    if (res.status !== 200) throw httpError(what, res);
    const len = res.headers.get("content-length");
    if (len === null || !/^\d+$/.test(len)) throw new ThinimgError("input", `${what}: server sent no object size`);
    return { key, etag: res.headers.get("etag"), size: Number(len) };
  }

  /** The first `n` bytes of an object (fewer if it is shorter), pinned to the listed ETag. */
  async firstBytes(key: string, n: number, etag: string | null, signal?: AbortSignal): Promise<Uint8Array> {
    const what = this.uri(key);
    let res: Response;
    try {
      res = await fetch(this.url(key, "GET"), {
        headers: { range: `bytes=0-${n - 1}`, "accept-encoding": "identity", ...(etag ? { "if-match": etag } : {}) },
        signal,
        decompress: false,
      });
    } catch (e) {
      throw networkError(what, e);
    }
    if (res.status === 416) return new Uint8Array(0); // an empty object
    if (res.status !== 200 && res.status !== 206) throw httpError(what, res, await errorBody(res));
    const bytes = new Uint8Array(await res.arrayBuffer());
    return bytes.subarray(0, n); // a server ignoring Range sends it all: only the start is used
  }

  /** Objects directly under a prefix ("dir/" → "dir/1.tar", not "dir/sub/x"), all pages. */
  async list(prefix: string, signal?: AbortSignal, pageSize = 1000): Promise<S3Object[]> {
    const byKey = new Map<string, S3Object>();
    let token: string | undefined;
    for (let page = 0; ; page++) {
      if (page >= MAX_LIST_PAGES) {
        throw new ThinimgError("policy", `${this.uri(prefix)}: more than ${MAX_LIST_PAGES} pages of objects`, {
          hint: "a layer family holds a handful of layers; point at the right prefix",
        });
      }
      const { objects, next } = this.client ? await this.listSigned(prefix, token, pageSize) : await this.listAnonymous(prefix, token, pageSize, signal);
      for (const o of objects) {
        if (!o.key.startsWith(prefix) || o.key.slice(prefix.length).includes("/")) continue;
        const seen = byKey.get(o.key);
        // Some servers repeat keys across pages; a repeat with another ETag means a concurrent change.
        if (seen && (seen.etag !== o.etag || seen.size !== o.size)) {
          throw new ThinimgError("input", `${this.uri(o.key)}: changed while the prefix was being listed`, {
            hint: "run again once uploads are finished",
          });
        }
        byKey.set(o.key, o);
      }
      if (!next) break;
      token = next;
    }
    return [...byKey.values()];
  }

  private async listSigned(prefix: string, token: string | undefined, pageSize: number): Promise<{ objects: S3Object[]; next?: string }> {
    try {
      const r = await this.client!.list({
        prefix,
        delimiter: "/",
        maxKeys: pageSize,
        ...(token ? { continuationToken: token } : {}),
      });
      const objects = (r.contents ?? []).map((c) => ({ key: c.key, etag: c.eTag ?? null, size: c.size ?? 0 }));
      return { objects, ...(r.isTruncated && r.nextContinuationToken ? { next: r.nextContinuationToken } : {}) };
    } catch (e) {
      const code = (e as { code?: string }).code;
      const what = this.uri(prefix);
      if (code === "NoSuchBucket") throw new ThinimgError("input", `${what}: no such bucket`, { hint: "check the bucket name and the endpoint" });
      if (code === "AccessDenied" || code === "InvalidAccessKeyId" || code === "SignatureDoesNotMatch") {
        throw new ThinimgError("input", `${what}: access denied (${code})`, {
          hint: "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION, or unset them for a public bucket",
        });
      }
      if (code === "ConnectionRefused" || code === "ECONNREFUSED") throw networkError(what, e);
      throw new ThinimgError("input", `${what}: listing failed: ${code ? `${code}: ` : ""}${errorMessage(e)}`, {
        hint: "check the endpoint (AWS_ENDPOINT_URL), region and network",
        cause: e,
      });
    }
  }

  private async listAnonymous(
    prefix: string,
    token: string | undefined,
    pageSize: number,
    signal?: AbortSignal,
  ): Promise<{ objects: S3Object[]; next?: string }> {
    const what = this.uri(prefix);
    const q = new URLSearchParams({ "list-type": "2", prefix, delimiter: "/", "max-keys": String(pageSize) });
    if (token) q.set("continuation-token", token);
    let res: Response;
    try {
      res = await fetch(`${this.plainUrl()}/?${q}`, { signal });
    } catch (e) {
      throw networkError(what, e);
    }
    if (res.status !== 200) throw httpError(what, res, await errorBody(res));
    const text = await res.text();
    if (text.length > 16 * 1024 * 1024) throw new ThinimgError("input", `${what}: listing response too large`);
    let doc: v.InferOutput<typeof ListResult>;
    try {
      doc = v.parse(ListResult, Bun.XML.parse(text));
    } catch (e) {
      throw new ThinimgError("input", `${what}: unreadable listing (${errorMessage(e).slice(0, 200)})`, {
        hint: "the endpoint did not answer like S3 ListObjectsV2",
      });
    }
    const r = doc.ListBucketResult;
    const contents = r.Contents === undefined ? [] : Array.isArray(r.Contents) ? r.Contents : [r.Contents];
    const objects = contents.map((c) => ({ key: c.Key, etag: c.ETag ?? null, size: Number(c.Size) }));
    return { objects, ...(r.IsTruncated === "true" && r.NextContinuationToken ? { next: r.NextContinuationToken } : {}) };
  }
}
