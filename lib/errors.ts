// One error type for everything a user or operator can act on: it carries the exit code and a hint
// (the next step to take). Anything that is not a ThinimgError is a bug and keeps its stack trace.

export type ErrorKind =
  | "usage" // bad flags or arguments
  | "input" // bad image, bad file, bad config
  | "policy" // refused on purpose (limits, hostile image, lock held)
  | "unhealthy" // pre-flight health check blocked dm work
  | "dm" // a device-mapper / system command failed
  | "timeout"
  | "missing" // a required tool, file or device is absent
  | "conflict" // already exists / busy / locked
  | "internal";

/** The exit code of each error kind (listed in every command's --help). */
export const EXIT_CODES: Record<ErrorKind, number> = {
  usage: 2,
  input: 3,
  policy: 4,
  unhealthy: 1,
  dm: 5,
  timeout: 6,
  missing: 7,
  conflict: 8,
  internal: 70,
};

export class ThinimgError extends Error {
  readonly kind: ErrorKind;
  readonly hint: string | undefined;
  readonly exitCode: number;
  /** Extra structured data for --json error output. */
  readonly details: Record<string, unknown> | undefined;
  /** What the command had done when it failed, in its own --json shape (e.g. the layers an unpack
   * built before the one that failed); carried by the error envelope. */
  partial: Record<string, unknown> | undefined;

  constructor(kind: ErrorKind, message: string, opts: { hint?: string; exitCode?: number; cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "ThinimgError";
    this.kind = kind;
    this.hint = opts.hint;
    this.exitCode = opts.exitCode ?? EXIT_CODES[kind];
    this.details = opts.details;
  }

  /** The single line a user sees. */
  oneLine(): string {
    return this.hint ? `${this.message} — ${this.hint}` : this.message;
  }
}

/** The JSON error envelope every command (--json) and the service answer with. */
export function errorEnvelope(e: ThinimgError): {
  ok: false;
  error: { kind: ErrorKind; message: string; hint: string | null; details?: Record<string, unknown> };
  partial?: Record<string, unknown>;
} {
  const error = { kind: e.kind, message: e.message, hint: e.hint ?? null, ...(e.details ? { details: e.details } : {}) };
  return { ok: false, error, ...(e.partial ? { partial: e.partial } : {}) };
}

/** A caller's value cut to `max` characters: a name or path of any length may arrive (a
 * 5000-character URL path), and a message or log line that shows it stays one readable line. */
export function cut(value: string, max: number): string {
  return value.length > max ? `${value.slice(0, max)}…` : value;
}

/** A caller's value quoted in a message, cut to `max` characters. */
export function quoted(value: string, max = 80): string {
  return JSON.stringify(cut(value, max));
}

export const usageError = (message: string, hint?: string) => new ThinimgError("usage", message, { hint: hint ?? "see --help" });

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

// Ordinary filesystem errors (a read-only or full disk, a missing directory, no permission) are
// something an operator acts on, not a bug: one line naming the path, with the next step.
const ERRNO: Record<string, { kind: ErrorKind; what: string; hint: string }> = {
  EACCES: { kind: "input", what: "permission denied", hint: "run as root, or choose a path this user may write" },
  EPERM: { kind: "input", what: "operation not permitted", hint: "run as root, or choose a path this user may write" },
  EROFS: { kind: "input", what: "read-only file system", hint: "choose a path on a writable filesystem (or remount it read-write)" },
  ENOSPC: { kind: "dm", what: "no space left on device", hint: "free space on that filesystem and re-run" },
  EDQUOT: { kind: "dm", what: "disk quota exceeded", hint: "free space (or raise the quota) and re-run" },
  EIO: { kind: "dm", what: "input/output error", hint: "check the disk and the kernel log (dmesg); do not retry blindly" },
  ENOENT: { kind: "missing", what: "no such file or directory", hint: "check the path (and that the filesystem holding it is mounted)" },
  ENOTDIR: { kind: "input", what: "a component of the path is not a directory", hint: "check the path" },
  EISDIR: { kind: "input", what: "is a directory", hint: "check the path" },
  EEXIST: { kind: "conflict", what: "already exists", hint: "choose another path" },
  ENAMETOOLONG: { kind: "input", what: "file name too long", hint: "choose a shorter path" },
  ELOOP: { kind: "input", what: "too many levels of symbolic links", hint: "check the path" },
  EBUSY: { kind: "conflict", what: "device or resource busy", hint: "find what holds it (mount, open file) and retry" },
};

/** The parts of a failed system call (Node's ErrnoException: code "EACCES", syscall, path, dest);
 * null when `e` is not one (or is already a ThinimgError). */
export function errnoOf(e: unknown): { code: string; syscall: string | null; path: string | null; dest: string | null } | null {
  if (!(e instanceof Error) || e instanceof ThinimgError) return null;
  const x = e as Error & { code?: unknown; syscall?: unknown; path?: unknown; dest?: unknown };
  if (typeof x.code !== "string" || !/^E[A-Z0-9]+$/.test(x.code)) return null;
  const str = (v: unknown) => (typeof v === "string" ? v : null);
  return { code: x.code, syscall: str(x.syscall), path: str(x.path), dest: str(x.dest) };
}

/** A ThinimgError for a filesystem errno error (EACCES, EROFS, ENOSPC, ENOENT, …); null for
 * anything else (a bug keeps its stack). pathHint names the file for fd-based calls (ftruncate). */
export function fromErrno(e: unknown, pathHint?: string): ThinimgError | null {
  const x = errnoOf(e);
  const m = x ? ERRNO[x.code] : undefined;
  if (!x || !m) return null;
  const op = x.syscall ?? "file operation";
  const p = x.path ?? pathHint ?? null;
  const path = p ? ` ${p}` : "";
  const dest = x.dest ? ` → ${x.dest}` : "";
  return new ThinimgError(m.kind, `${op}${path}${dest}: ${m.what} (${x.code})`, {
    hint: m.hint,
    cause: e,
    details: { errno: x.code, syscall: op, path: p },
  });
}
