// Request authentication for /v1/*: an HMAC-SHA256 signature over "<timestamp>.<raw body>" with a
// shared secret (headers X-Thinimg-Timestamp, X-Thinimg-Signature: sha256=<hex>), at most 300 s of
// clock skew, each signature accepted once within that window (replay); or, when a token file is
// configured, `Authorization: Bearer <token>` (for callers that cannot sign, e.g. an EventBridge API
// destination). Comparisons are constant-time. Secrets are never logged.
import { createHmac, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { ThinimgError } from "../errors.ts";
import { HttpError } from "./http-error.ts";

export const TIMESTAMP_HEADER = "x-thinimg-timestamp";
export const SIGNATURE_HEADER = "x-thinimg-signature";
export const MAX_SKEW_S = 300;

export interface Secrets {
  /** HMAC key; null: signatures are not accepted. */
  hmac: Uint8Array | null;
  /** Bearer token; null: bearer auth is not accepted. */
  bearer: Uint8Array | null;
}

const unauthorized = (message: string, hint: string) => new HttpError(401, "policy", message, hint);

/** Read a secret file: its content without the trailing newline; refused when empty. */
export function readSecretFile(path: string, what: string): Uint8Array {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new ThinimgError("input", `cannot read the ${what} file ${path}: ${(e as NodeJS.ErrnoException).code ?? "error"}`, {
      hint: "check the path and that the service user may read it (mode 0600, owned by root)",
    });
  }
  const secret = text.replace(/\r?\n$/, "");
  if (secret.length < 16) {
    throw new ThinimgError("input", `the ${what} file ${path} holds ${secret.length} characters; at least 16 are needed`, {
      hint: "generate one with: openssl rand -hex 32 > FILE",
    });
  }
  return new TextEncoder().encode(secret);
}

/** hex HMAC-SHA256(secret, "<timestamp>.<body>") — what a caller puts after "sha256=". */
export function sign(secret: Uint8Array | string, timestamp: string, body: string | Uint8Array): string {
  return createHmac("sha256", secret).update(`${timestamp}.`).update(body).digest("hex");
}

/** Equal-length views (hashes) so timingSafeEqual never throws and leaks no length. */
function sameSecret(a: Uint8Array, b: Uint8Array): boolean {
  const h = (x: Uint8Array) => createHmac("sha256", "thinimg-compare").update(x).digest();
  return timingSafeEqual(h(a), h(b));
}

/** Signatures seen within the skew window (replay protection); pruned as they expire. */
export class ReplayCache {
  private seen = new Map<string, number>();

  /** Record `sig`; false when it was already seen and has not expired. */
  admit(sig: string, nowS: number): boolean {
    for (const [k, exp] of this.seen) {
      if (exp >= nowS) break; // insertion order is expiry order (same window for all)
      this.seen.delete(k);
    }
    if (this.seen.has(sig)) return false;
    this.seen.set(sig, nowS + 2 * MAX_SKEW_S);
    return true;
  }

  get size(): number {
    return this.seen.size;
  }
}

export interface AuthRequest {
  method: string;
  header(name: string): string | undefined;
  body: Uint8Array;
}

/** Throws a 401 ThinimgError unless the request carries a valid bearer token or a fresh, valid,
 * unseen signature (for requests that change state). */
export function authenticate(req: AuthRequest, secrets: Secrets, replay: ReplayCache, nowS = Math.floor(Date.now() / 1000)): "bearer" | "hmac" {
  const authz = req.header("authorization");
  if (secrets.bearer && authz?.startsWith("Bearer ")) {
    if (sameSecret(new TextEncoder().encode(authz.slice(7).trim()), secrets.bearer)) return "bearer";
    throw unauthorized("bad bearer token", "send the token from the service's --token-file");
  }
  const ts = req.header(TIMESTAMP_HEADER);
  const sig = req.header(SIGNATURE_HEADER);
  if (!secrets.hmac) throw unauthorized("missing bearer token", "send Authorization: Bearer <token from --token-file>");
  if (!ts || !sig) {
    throw unauthorized(
      "missing X-Thinimg-Timestamp / X-Thinimg-Signature headers",
      'sign the request: X-Thinimg-Signature: sha256=HMAC-SHA256(secret, "<timestamp>.<body>") in hex (docs/ops-service.md)',
    );
  }
  if (!/^\d{1,12}$/.test(ts)) throw unauthorized("X-Thinimg-Timestamp is not unix seconds", "send the current time as whole seconds since the epoch");
  if (Math.abs(nowS - Number(ts)) > MAX_SKEW_S) {
    throw unauthorized(
      `stale timestamp: ${Math.abs(nowS - Number(ts))} s from the server's clock (limit ${MAX_SKEW_S} s)`,
      "sign each request when it is sent, and keep clocks in sync (NTP)",
    );
  }
  const m = /^sha256=([0-9a-f]{64})$/i.exec(sig);
  const expected = Buffer.from(sign(secrets.hmac, ts, req.body), "hex");
  if (!m || !timingSafeEqual(Buffer.from(m[1]!, "hex"), expected)) {
    throw unauthorized("bad signature", 'the signature is hex HMAC-SHA256(secret, "<timestamp>.<raw body>"), sent as sha256=<hex>');
  }
  // a read (GET) is checked for validity and freshness only: a poller signs an empty body, so two
  // polls in one second carry the same signature; anything that changes state is accepted once
  if (req.method !== "GET" && req.method !== "HEAD" && !replay.admit(m[1]!.toLowerCase(), nowS))
    throw unauthorized("replayed request: this signature was already used", "sign every request afresh (a new timestamp)");
  return "hmac";
}
