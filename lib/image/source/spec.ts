// Parsing a SOURCE argument: a local path, an http(s) URL or an s3:// URL, each optionally with
// ":REF" selecting an image inside (docker tag / OCI ref.name). REFs may contain ":" and "/"
// ("img.tar:app:1", "img.tar:docker.io/library/alpine:3.19"), so splitting is decided by what
// exists, not by syntax:
//  - local: the whole string if it exists, else the first split (left to right) whose path exists;
//  - URLs and S3 keys: candidates are tried in order — the whole URL/key first, then a split at each
//    ":" of the path, left to right — and the first that exists wins (a 404 moves on). URLs with a
//    query string (presigned) are never split. --select avoids all guessing.
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { ThinimgError, usageError } from "../../errors.ts";

export type SourceSpec =
  | { kind: "local"; path: string; select: string | null }
  | { kind: "http"; candidates: { url: string; select: string | null }[] }
  | { kind: "s3"; bucket: string; prefix: boolean; candidates: { key: string; select: string | null }[] };

// S3 bucket names (incl. legacy upper-case ones); the rest is the server's business.
const BUCKET = /^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$/;

/** Every "path:ref" split of a path at a ":" (left to right), skipping empty sides. */
function splits(path: string): [string, string][] {
  const out: [string, string][] = [];
  for (let i = path.indexOf(":"); i >= 0; i = path.indexOf(":", i + 1)) {
    const left = path.slice(0, i);
    const ref = path.slice(i + 1);
    if (left !== "" && !left.endsWith("/") && ref !== "") out.push([left, ref]);
  }
  return out;
}

export function parseSource(raw: string, select?: string): SourceSpec {
  if (!raw || raw.includes("\0")) throw usageError("SOURCE is empty or invalid");
  const explicit = select ? select : null;

  if (/^s3:\/\//i.test(raw)) {
    const rest = raw.slice(5);
    const slash = rest.indexOf("/");
    const bucket = slash < 0 ? rest : rest.slice(0, slash);
    const key = slash < 0 ? "" : rest.slice(slash + 1);
    if (!BUCKET.test(bucket)) {
      throw usageError(`"${bucket}" is not an S3 bucket name`, "use s3://BUCKET/KEY or s3://BUCKET/PREFIX/");
    }
    if (key === "" || key.endsWith("/")) {
      return { kind: "s3", bucket, prefix: true, candidates: [{ key, select: explicit }] };
    }
    const candidates = [{ key, select: explicit }];
    if (!explicit) for (const [k, ref] of splits(key)) candidates.push({ key: k, select: ref });
    return { kind: "s3", bucket, prefix: false, candidates };
  }

  if (/^https?:\/\//i.test(raw)) {
    let url: URL;
    try {
      url = new URL(raw);
    } catch {
      throw usageError(`"${raw}" is not a valid URL`);
    }
    const candidates = [{ url: url.href, select: explicit }];
    if (!explicit && !url.search && !url.hash) {
      for (const [path, ref] of splits(url.pathname)) {
        const u = new URL(url.href);
        u.pathname = path;
        candidates.push({ url: u.href, select: decodeURIComponent(ref) });
      }
    }
    return { kind: "http", candidates };
  }

  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(raw)) {
    throw usageError(`unsupported source scheme in "${raw}"`, "use a local path, http(s)://… or s3://…");
  }

  // local path
  if (existsSync(raw)) return { kind: "local", path: resolve(raw), select: explicit };
  for (let i = explicit ? -1 : raw.indexOf(":"); i > 0; i = raw.indexOf(":", i + 1)) {
    const p = raw.slice(0, i);
    if (existsSync(p)) return { kind: "local", path: resolve(p), select: raw.slice(i + 1) || null };
  }
  throw new ThinimgError("input", `${raw}: no such file or directory`, {
    hint: "give a local path, http(s)://… or s3://BUCKET/KEY (append :TAG to choose an image)",
  });
}
