// Streaming download of one remote object (HTTP URL, or S3 through a presigned / public URL) into
// the blob cache, resuming an interrupted one with a Range request. Size cap on the bytes actually received (a Content-Length is only used to refuse
// early); an ETag/size pinned by a HEAD or a listing is enforced on the GET (If-Match, response
// ETag, exact length), so an object replaced mid-run is an error, not a mixed image.
import { errorMessage, ThinimgError } from "../../errors.ts";
import { log } from "../../log.ts";
import { withRetry } from "../../util/retry.ts";
import type { BlobCache, PartialDownload, SourceRecord, StoredBlob } from "../cache.ts";
import { tooBig } from "../digest.ts";
import type { DownloadProgress } from "../types.ts";

export interface Pin {
  etag: string | null;
  size: number | null;
}

export interface DownloadOptions {
  /** The URL to GET (may carry a presigned query). */
  url: string;
  /** For messages and the cache index — never contains credentials. */
  what: string;
  /** Cache index key ("http:URL", "s3:ENDPOINT/BUCKET/KEY"). */
  key: string;
  maxBytes: number;
  /** ETag/size seen in a listing or HEAD; the GET must deliver exactly that object. */
  pin?: Pin;
  signal?: AbortSignal | undefined;
  onProgress?: ((p: DownloadProgress) => void) | undefined;
  /** Transient failures (connection dropped, 5xx, 429) are retried with backoff; a retry after a
   * dropped transfer resumes where it stopped. Default 4 attempts, 1 s doubling. */
  retry?: { attempts: number; baseDelayMs: number };
  /** See IngestOptions.onTmp (a reader following the download). */
  onTmp?: ((path: string, bytes: number) => void) | undefined;
}

export interface Downloaded extends StoredBlob {
  etag: string | null;
  /** True when the cache already had it (no body transferred). */
  cached: boolean;
}

/** ETags compare without weak prefix and quotes ("W/\"x\"" ~ "x"). */
export function sameEtag(a: string | null | undefined, b: string | null | undefined): boolean {
  const n = (s: string) => s.replace(/^W\//, "").replace(/^"|"$/g, "");
  return !!a && !!b && n(a) === n(b);
}

const NET_CODES: Record<string, string> = {
  ECONNREFUSED: "connection refused",
  ECONNRESET: "connection closed before the end of the transfer",
  ENOTFOUND: "host not found",
  ETIMEDOUT: "timed out",
  ConnectionRefused: "connection refused",
  ConnectionClosed: "connection closed before the end of the transfer",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "TLS certificate not trusted",
  DEPTH_ZERO_SELF_SIGNED_CERT: "TLS certificate is self-signed",
};

/** Worth another try: the connection dropped or timed out (not: refused, unknown host, bad TLS). */
const TRANSIENT_CODES = new Set(["ECONNRESET", "ETIMEDOUT", "ConnectionClosed", "EPIPE", "ECONNABORTED"]);

export function networkError(what: string, e: unknown): ThinimgError {
  if (e instanceof ThinimgError) return e;
  const code = (e as { code?: unknown } | null)?.code;
  const known = typeof code === "string" ? NET_CODES[code] : undefined;
  const detail = known ? `${known} (${code})` : errorMessage(e).split("\n")[0]!.slice(0, 200);
  return new ThinimgError("input", `${what}: cannot fetch: ${detail}`, {
    hint: "check the address, the network and any proxy settings",
    cause: e,
    details: { transient: typeof code === "string" && TRANSIENT_CODES.has(code) },
  });
}

/** A fetch failure another attempt may cure: a dropped connection, a 5xx, 429 (S3's SlowDown is a 503). */
export function isTransientFetch(e: unknown): boolean {
  if (!(e instanceof ThinimgError)) return false;
  if (e.details?.transient === true) return true;
  const status = e.details?.status;
  return typeof status === "number" && (status >= 500 || status === 429);
}

export function httpError(what: string, res: Response, body = ""): ThinimgError {
  const code = /<Code>([^<]{1,100})<\/Code>/.exec(body)?.[1];
  const detail = `HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ""}${code ? ` (${code})` : ""}`;
  const hint =
    res.status === 404
      ? "check the URL / key; for an S3 layer family end the prefix with /"
      : res.status === 403 || res.status === 401
        ? "access denied: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (S3) or check the URL's permissions"
        : res.status === 412
          ? "the object changed while being fetched; run again"
          : "the server refused the request; retry later or check the server";
  return new ThinimgError("input", `${what}: ${detail}`, { hint, details: { status: res.status } });
}

/** Read (a bounded part of) an error body, for an S3 error code. */
export async function errorBody(res: Response): Promise<string> {
  try {
    const reader = res.body?.getReader();
    if (!reader) return "";
    const r = await reader.read();
    await reader.cancel().catch(() => {});
    return r.done ? "" : new TextDecoder().decode(r.value.subarray(0, 4096));
  } catch {
    return "";
  }
}

/**
 * GET into the cache unless the index says we already have this exact object. With a pin (S3),
 * the hit is decided before any request; without one (plain HTTP) a conditional GET
 * (If-None-Match) lets the server answer 304.
 */
export function download(cache: BlobCache, o: DownloadOptions): Promise<Downloaded> {
  const r = o.retry ?? { attempts: 4, baseDelayMs: 1000 };
  return withRetry(`fetch ${o.what}`, () => downloadOnce(cache, o), { ...r, transient: isTransientFetch });
}

async function downloadOnce(cache: BlobCache, o: DownloadOptions): Promise<Downloaded> {
  const rec = cache.lookupSource(o.key);
  if (rec && o.pin && sameEtag(rec.etag, o.pin.etag) && (o.pin.size === null || rec.size === o.pin.size)) {
    log.debug(`cache hit ${o.what} → ${rec.digest}`);
    return { digest: rec.digest, size: rec.size, path: cache.path(rec.digest), etag: rec.etag, cached: true };
  }
  if (o.pin?.size != null && o.pin.size > o.maxBytes) throw tooBig(o.what, o.maxBytes);

  // An earlier interrupted transfer of the same object version resumes with a Range request:
  // pinned (S3) when the ETag and size still match; else (HTTP) guarded by If-Range.
  let partial = cache.claimPartial(o.key);
  if (partial && o.pin && !(sameEtag(partial.etag, o.pin.etag) && partial.size === o.pin.size)) {
    cache.dropPartial(partial);
    partial = null;
  }
  try {
    return await get(cache, o, rec, partial);
  } catch (e) {
    if (partial) cache.dropPartial(partial); // no-op when ingest kept or consumed it
    // 416: the partial already had every byte (a crash before the rename); start over once
    if (partial && e instanceof ThinimgError && e.details?.status === 416) return get(cache, o, rec, null);
    throw e;
  }
}

async function get(cache: BlobCache, o: DownloadOptions, rec: SourceRecord | null, partial: PartialDownload | null): Promise<Downloaded> {
  let res: Response;
  try {
    res = await fetch(o.url, { headers: requestHeaders(o, rec, partial), signal: o.signal, redirect: "follow", decompress: false });
  } catch (e) {
    throw networkError(o.what, e);
  }
  if (res.status === 304 && rec) {
    await res.body?.cancel().catch(() => {});
    log.debug(`not modified ${o.what} → ${rec.digest}`);
    return { digest: rec.digest, size: rec.size, path: cache.path(rec.digest), etag: rec.etag, cached: true };
  }
  const resume = await resumeOf(cache, o, res, partial);
  const etag = res.headers.get("etag");
  const declared = await checkResponse(o, res, etag, resume?.bytes ?? 0);
  if (!res.body) throw new ThinimgError("input", `${o.what}: empty response`);
  const total = o.pin?.size ?? declared;
  let stored: StoredBlob;
  try {
    stored = await cache.ingest(res.body, {
      what: o.what,
      maxBytes: o.maxBytes,
      size: total,
      signal: o.signal,
      resume,
      keepPartial: etag ? { key: o.key, etag, size: total } : undefined,
      onTmp: o.onTmp,
      onBytes: o.onProgress ? (bytes) => o.onProgress!({ what: o.what, bytes, total }) : undefined,
    });
  } catch (e) {
    throw networkError(o.what, e);
  }
  cache.recordSource({ key: o.key, etag, size: stored.size, digest: stored.digest, lastModified: res.headers.get("last-modified") });
  log.debug(`fetched ${o.what} (${stored.size} bytes) → ${stored.digest}`);
  return { ...stored, etag, cached: false };
}

/** The GET's headers: pinned ETag, a Range to resume `partial`, or a conditional GET on `rec`. */
function requestHeaders(o: DownloadOptions, rec: SourceRecord | null, partial: PartialDownload | null): Record<string, string> {
  const headers: Record<string, string> = { "accept-encoding": "identity" };
  if (o.pin?.etag) headers["if-match"] = o.pin.etag;
  if (partial) {
    headers.range = `bytes=${partial.bytes}-`;
    if (!o.pin?.etag) headers["if-range"] = partial.etag;
  } else if (!o.pin && rec?.etag) headers["if-none-match"] = rec.etag;
  return headers;
}

/** The partial download a 206 resumes (checked against Content-Range); a 200 drops it; else an error. */
async function resumeOf(cache: BlobCache, o: DownloadOptions, res: Response, partial: PartialDownload | null): Promise<PartialDownload | undefined> {
  if (res.status === 206 && partial) {
    const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers.get("content-range") ?? "");
    const expectTotal = o.pin?.size ?? partial.size;
    if (!m || Number(m[1]) !== partial.bytes || (expectTotal !== null && m[3] !== "*" && Number(m[3]) !== expectTotal)) {
      await res.body?.cancel().catch(() => {});
      throw new ThinimgError("input", `${o.what}: server resumed at the wrong place (${res.headers.get("content-range")})`, {
        hint: "run again; the partial download has been discarded",
      });
    }
    log.debug(`resuming ${o.what} at byte ${partial.bytes}`);
    return partial;
  }
  if (res.status === 200) {
    if (partial) {
      cache.dropPartial(partial); // the server sent the whole object (changed, or no Range support)
    }
    return undefined;
  }
  throw httpError(o.what, res, await errorBody(res));
}

/**
 * Refuse a response that changed under its pin, was transfer-encoded or is too big; the size it
 * declares (from `offset`, where a resumed body starts), or null.
 */
async function checkResponse(o: DownloadOptions, res: Response, etag: string | null, offset: number): Promise<number | null> {
  if (o.pin?.etag && !sameEtag(etag, o.pin.etag)) {
    await res.body?.cancel().catch(() => {});
    throw new ThinimgError("input", `${o.what}: changed since it was listed (ETag ${o.pin.etag} → ${etag ?? "none"})`, {
      hint: "the object was replaced while the image was being fetched; run again once uploads are finished",
    });
  }
  const encoding = res.headers.get("content-encoding");
  if (encoding && encoding !== "identity") {
    await res.body?.cancel().catch(() => {});
    throw new ThinimgError("input", `${o.what}: server applied Content-Encoding ${encoding}`, {
      hint: "serve the file as-is (no transfer compression); compressed layers are detected by content",
    });
  }
  const lenHeader = res.headers.get("content-length");
  const declared = lenHeader !== null && /^\d+$/.test(lenHeader) ? offset + Number(lenHeader) : null;
  if (declared !== null && declared > o.maxBytes) {
    await res.body?.cancel().catch(() => {});
    throw tooBig(o.what, o.maxBytes);
  }
  if (o.pin?.size != null && declared !== null && declared !== o.pin.size) {
    await res.body?.cancel().catch(() => {});
    throw new ThinimgError("input", `${o.what}: changed since it was listed (${o.pin.size} → ${declared} bytes)`, {
      hint: "the object was replaced while the image was being fetched; run again once uploads are finished",
    });
  }
  return declared;
}
