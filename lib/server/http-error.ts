// HTTP status for thinimg's errors. Every error a route answers with is the CLI's own envelope
// ({"ok": false, "error": {"kind", "message", "hint"}}); the status comes from the error's kind, or
// from an HttpError where the kind alone cannot say it (401, 404, 413, 503 draining).
import { type ErrorKind, errorEnvelope, ThinimgError } from "../errors.ts";

export class HttpError extends ThinimgError {
  constructor(
    readonly status: number,
    kind: ErrorKind,
    message: string,
    hint?: string,
  ) {
    super(kind, message, hint === undefined ? {} : { hint });
  }
}

const STATUS: Record<ErrorKind, number> = {
  usage: 400,
  input: 400,
  policy: 403,
  conflict: 409,
  missing: 404,
  unhealthy: 503,
  timeout: 504,
  dm: 500,
  internal: 500,
};

export function statusOf(e: ThinimgError): number {
  return e instanceof HttpError ? e.status : STATUS[e.kind];
}

/** The body and status for any error; a non-ThinimgError is a bug and says only that. */
export function errorResponse(e: unknown): { status: number; body: ReturnType<typeof errorEnvelope> } {
  if (e instanceof ThinimgError) return { status: statusOf(e), body: errorEnvelope(e) };
  const bug = new ThinimgError("internal", "internal error", { hint: "a bug in thinimg: the service log has the stack trace" });
  return { status: 500, body: errorEnvelope(bug) };
}
