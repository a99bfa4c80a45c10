// Limits, the error a rule violation raises, and lexical name checks. Kept apart from the code
// that touches the filesystem so the rules can be read (and documented) in one place.
import { displayBytes } from "./bytepath.ts";

export interface Limits {
  /** Entries (files, dirs, links, whiteouts…) in one layer. */
  maxEntries: number;
  /** Bytes of the uncompressed layer stream (headers, data, padding), i.e. the tar size. */
  maxTotalBytes: number;
  /** Bytes of one regular file. */
  maxFileBytes: number;
  /** Path components of one entry name (and of any path it resolves to). */
  maxDepth: number;
  /** Bytes of one entry name or link target, as written in the archive. */
  maxPathBytes: number;
}

const GiB = 1024 ** 3;

export const DEFAULT_LIMITS: Readonly<Limits> = Object.freeze({
  maxEntries: 100_000,
  maxTotalBytes: 10 * GiB,
  maxFileBytes: 1 * GiB,
  maxDepth: 1024,
  maxPathBytes: 4096,
});

/** Symlinks followed while resolving one parent path (Linux's own MAXSYMLINKS). */
export const MAX_SYMLINK_HOPS = 40;
/**
 * Components walked while resolving one parent path, beyond maxDepth: symlink targets of
 * `d/../d/../…` must not multiply the work of each lookup (a real image walks a few dozen).
 */
export const MAX_WALK_COMPONENTS = 4096;

/**
 * A rule broken by one entry. Converted by applyLayer into
 * ThinimgError(kind, "layer <label>: entry <path>: <rule>").
 */
export class RuleError extends Error {
  constructor(
    readonly kind: "policy" | "input",
    readonly rule: string,
    readonly hint?: string,
  ) {
    super(rule);
    this.name = "RuleError";
  }
}

export const HOSTILE_HINT = "the image is malformed or hostile; nothing outside the destination was changed";
export const DEPTH_HINT = "raise --max-depth / THINIMG_MAX_DEPTH if the image is legitimate (else it is malformed or hostile)";

export function mergeLimits(partial: Partial<Limits> | undefined): Limits {
  const l: Limits = { ...DEFAULT_LIMITS, ...(partial ?? {}) };
  for (const [k, v] of Object.entries(l)) {
    if (!Number.isSafeInteger(v) || v <= 0) throw new TypeError(`limits.${k} must be a positive integer, got ${v}`);
  }
  return l;
}

/**
 * Lexical normalisation of an archive path: leading "/" dropped (absolute names are taken relative
 * to the root, as containerd, umoci and GNU tar do), "" and "." dropped, ".." folded. A name that
 * climbs above the root is refused (docker's rule) rather than clamped: no image builder writes one.
 */
export function splitName(name: string, what = "path"): string[] {
  const out: string[] = [];
  const parts = name.split("/");
  for (let i = 0; i < parts.length; i++) {
    const c = parts[i]!;
    if (c === "" || c === ".") continue;
    if (c === "..") {
      if (out.length === 0) throw new RuleError("policy", `${what} climbs out of the root ("..")`, HOSTILE_HINT);
      out.pop();
      continue;
    }
    out.push(c);
  }
  return out;
}

/** `name` is a byte string (see bytepath.ts): its length is its size in bytes. */
export function checkNameBytes(name: string, limits: Limits, what: string): void {
  if (name.length > limits.maxPathBytes) {
    throw new RuleError(
      "policy",
      `${what} is longer than ${limits.maxPathBytes} bytes (maxPathBytes)`,
      "raise --max-path-bytes / THINIMG_MAX_PATH_BYTES if the image is legitimate",
    );
  }
}

/** One line, printable, bounded: entry names (byte strings) come from hostile input. */
export const displayName = (name: string): string => displayBytes(name);
