// The source allow-list: a caller may only name sources under a prefix the operator listed
// (--allow-source, repeatable; none by default), so a webhook can never make the host read its own
// files or reach an address nobody meant it to. Sources are normalized the way the pipeline will
// read them (lib/image/source/spec.ts parses them) before the prefix match, and anything that could
// mean something else after normalization (dot segments, backslashes, credentials in URLs) is refused.
import { realpathSync } from "node:fs";
import { isAbsolute, resolve } from "node:path";
import { quoted, ThinimgError, usageError } from "../errors.ts";
import { parseSource } from "../image/source/spec.ts";

export type SourceKind = "s3" | "http" | "local";

export interface AllowList {
  prefixes: { kind: SourceKind; prefix: string }[];
}

const refuse = (source: string, why: string, allow: AllowList) =>
  new ThinimgError("policy", `source ${quoted(source, 200)} is not allowed: ${why}`, {
    hint: allow.prefixes.length
      ? `this service reads only from: ${allow.prefixes.map((p) => p.prefix).join(", ")}`
      : "this service allows no source yet: start it with --allow-source PREFIX (e.g. s3://images-bucket/)",
  });

function kindOf(s: string): SourceKind | "other" {
  if (/^s3:\/\//i.test(s)) return "s3";
  if (/^https?:\/\//i.test(s)) return "http";
  if (/^file:/i.test(s)) return "local";
  if (/^[a-z][a-z0-9+.-]*:/i.test(s) && !s.startsWith("/")) return "other";
  return "local";
}

/** file:///abs/path → /abs/path; other local forms as given. */
function localPath(s: string): string {
  if (!/^file:/i.test(s)) return s;
  const u = new URL(s);
  if (u.host !== "" && u.host !== "localhost") throw usageError(`${s}: a file: URL must name a local path`);
  return decodeURIComponent(u.pathname);
}

/** Any "." or ".." path segment (also percent-encoded), a backslash or a control character. */
function ambiguous(s: string): string | null {
  if (/[\0-\x1f\x7f\\]/.test(s)) return "control characters and backslashes are not allowed";
  let decoded = s;
  try {
    decoded = decodeURIComponent(s);
  } catch {
    return "bad percent-encoding";
  }
  const path = decoded.replace(/^[a-z][a-z0-9+.-]*:\/\/[^/]*/i, "");
  if (path.split("/").some((seg) => seg === "." || seg === "..")) return `"." and ".." path segments are not allowed`;
  return null;
}

function canonical(kind: SourceKind, s: string): string {
  if (kind === "s3") return `s3://${s.slice(5)}`;
  if (kind === "http") {
    return new URL(s).href;
  }
  const p = resolve(localPath(s));
  try {
    return realpathSync(p);
  } catch {
    return p;
  }
}

/** Parse the operator's prefixes once (a bad one is a usage error at start-up). */
export function makeAllowList(prefixes: string[]): AllowList {
  return {
    prefixes: prefixes.map((raw) => {
      const kind = kindOf(raw);
      if (kind === "other")
        throw usageError(`--allow-source ${raw}: unsupported scheme`, "use s3://BUCKET/PREFIX, https://HOST/PATH or an absolute local directory");
      const bad = ambiguous(raw);
      if (bad) throw usageError(`--allow-source ${raw}: ${bad}`);
      if (kind === "local" && !isAbsolute(localPath(raw))) throw usageError(`--allow-source ${raw}: a local prefix must be an absolute path`);
      if (kind === "s3" && !/^s3:\/\/[^/]+\/?/i.test(raw)) throw usageError(`--allow-source ${raw}: name a bucket, e.g. s3://images-bucket/`);
      return { kind, prefix: canonical(kind, raw) };
    }),
  };
}

const under = (source: string, prefix: string) =>
  source === prefix || (source.startsWith(prefix) && (prefix.endsWith("/") || "/:".includes(source[prefix.length]!)));

/**
 * The source the pipeline gets when the allow-list admits `raw`; throws ThinimgError("policy")
 * (HTTP 403) otherwise. Local paths are checked before the filesystem is touched (no existence
 * oracle for callers without a local prefix) and compared by their real path (no symlink escape).
 */
export function admitSource(raw: string, allow: AllowList): string {
  const kind = kindOf(raw);
  if (kind === "other") throw refuse(raw, "unsupported scheme", allow);
  const bad = ambiguous(raw);
  if (bad) throw refuse(raw, bad, allow);
  const candidates = allow.prefixes.filter((p) => p.kind === kind);
  if (candidates.length === 0) throw refuse(raw, kind === "local" ? "local paths are not allowed" : `no ${kind} prefix is allowed`, allow);
  if (kind === "local") {
    const spec = parseSource(localPath(raw));
    if (spec.kind !== "local") throw refuse(raw, "not a local path", allow);
    const real = canonical("local", spec.path);
    if (!candidates.some((p) => under(real, p.prefix))) throw refuse(raw, "outside the allowed directories", allow);
    return spec.select ? `${real}:${spec.select}` : real;
  }
  parseSource(raw); // a malformed bucket or URL is the caller's usage error (400)
  if (kind === "http") {
    const u = new URL(raw);
    if (u.username || u.password) throw refuse(raw, "credentials in a source URL are not allowed", allow);
  }
  const c = canonical(kind, raw);
  if (!candidates.some((p) => under(c, p.prefix))) throw refuse(raw, "outside the allowed prefixes", allow);
  return c;
}
