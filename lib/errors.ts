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

const EXIT: Record<ErrorKind, number> = {
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

  constructor(
    kind: ErrorKind,
    message: string,
    opts: { hint?: string; exitCode?: number; cause?: unknown; details?: Record<string, unknown> } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "ThinimgError";
    this.kind = kind;
    this.hint = opts.hint;
    this.exitCode = opts.exitCode ?? EXIT[kind];
    this.details = opts.details;
  }

  /** The single line a user sees. */
  oneLine(): string {
    return this.hint ? `${this.message} — ${this.hint}` : this.message;
  }
}

export const usageError = (message: string, hint?: string) =>
  new ThinimgError("usage", message, { hint: hint ?? "see --help" });

export function isThinimgError(e: unknown): e is ThinimgError {
  return e instanceof ThinimgError;
}

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
