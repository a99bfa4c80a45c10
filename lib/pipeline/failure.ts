// Fail dumb: on an error path nothing is unmounted, removed or deleted. The failure and every
// resource it leaves behind are recorded, and the message names the GC command.
import { classifyDmError, DmError } from "../dm/errors.ts";
import { type ErrorKind, errorMessage, ThinimgError } from "../errors.ts";
import type { Leak } from "../store/work.ts";

export const GC_HINT = "review with `bun scripts/gc.ts` (dry-run), remove with `bun scripts/gc.ts --force`";

export function describeLeaks(leaks: Leak[]): string {
  return leaks.map((l) => `${l.kind === "thin_id" ? "thin id" : l.kind} ${l.ref}`).join(", ");
}

const DEVICE_ERRNOS = new Set(["EIO", "ENOSPC", "EROFS", "EUCLEAN", "EDQUOT"]);

/** What a failed command wrote to stderr (CommandError, DmError, or any error carrying it), or "". */
function commandStderr(e: unknown): string {
  if (!e || typeof e !== "object") return "";
  const r = (e as { result?: { stderr?: unknown } }).result;
  if (r && typeof r.stderr === "string") return r.stderr;
  const d = e instanceof ThinimgError ? e.details?.stderr : undefined;
  return typeof d === "string" ? d : "";
}

/** Map anything thrown during dm/fs work to (kind, stable error_kind). */
export function classify(e: unknown): { kind: ErrorKind; errorKind: string } {
  // sync -f, umount, mount, mkfs: the errno is only in the command's stderr — typed by lib/dm's
  // classifier (already done for a DmError; any other error carrying stderr goes through it here)
  const stderr = e instanceof DmError ? "" : commandStderr(e);
  const dmKind =
    e instanceof DmError
      ? e.dmKind
      : stderr
        ? classifyDmError({ argv: [], stdout: "", stderr, exitCode: 1, signal: null, timedOut: false, durationMs: 0 })
        : null;
  if (dmKind === "no_space") return { kind: "dm", errorKind: "no_space" };
  if (dmKind === "io") return { kind: "dm", errorKind: "io" };
  // applyLayer reports a failed syscall as an "input" error with details.code; a device error
  // (EIO, ENOSPC, EROFS after ext4 remounted read-only) is the host's fault, not the image's.
  const detailCode = e instanceof ThinimgError ? e.details?.code : undefined;
  if (e instanceof ThinimgError && !(typeof detailCode === "string" && DEVICE_ERRNOS.has(detailCode))) return { kind: e.kind, errorKind: e.kind };
  const code = typeof detailCode === "string" ? detailCode : (e as NodeJS.ErrnoException | null)?.code;
  if (code === "ENOSPC") return { kind: "dm", errorKind: "no_space" };
  if (code === "EIO" || code === "EROFS" || code === "EUCLEAN" || code === "EDQUOT") return { kind: "dm", errorKind: "io" };
  if (typeof code === "string") return { kind: "dm", errorKind: code.toLowerCase() };
  return { kind: "internal", errorKind: "internal" };
}

/** Permanent failures: re-running with the same input fails the same way, so a re-run refuses early. */
export function isPermanent(errorKind: string | null): boolean {
  return errorKind === "policy" || errorKind === "input";
}

/** The one-line error the user sees: what failed, why, what was left in place, and the GC command. */
export function failure(what: string, e: unknown, leaks: Leak[], override?: { kind?: ErrorKind; message?: string }): ThinimgError {
  const c = classify(e);
  const inner = override?.message ?? errorMessage(e);
  // the applier already says "layer 2/5 (…): entry …": don't say the layer twice
  const msg = inner.startsWith(`${what}:`) ? inner : `${what}: ${inner}`;
  const base = e instanceof ThinimgError ? e.hint : undefined;
  const hint = leaks.length ? `left in place (nothing was cleaned up): ${describeLeaks(leaks)}; ${GC_HINT}${base ? `; ${base}` : ""}` : base;
  return new ThinimgError(override?.kind ?? c.kind, msg, {
    hint,
    cause: e,
    details: { error_kind: c.errorKind, leaks, ...(e instanceof ThinimgError && e.details ? { cause: e.details } : {}) },
  });
}
