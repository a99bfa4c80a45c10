// dm failures typed from the command's stderr and exit status, so callers decide on a kind
// ("already exists", "gone", "busy", …) instead of matching message strings themselves.
import { ThinimgError } from "../errors.ts";
import type { CmdResult } from "../exec.ts";

export type DmErrorKind = "exists" | "not_found" | "busy" | "no_space" | "timeout" | "other";

export class DmError extends ThinimgError {
  readonly dmKind: DmErrorKind;
  readonly result: CmdResult;
  constructor(dmKind: DmErrorKind, result: CmdResult, hint?: string) {
    const what = result.argv.join(" ");
    const last = result.stderr.trim().split("\n").filter((l) => l && l !== "Command failed.").at(-1) ?? "";
    const why = result.timedOut ? `timed out after ${result.durationMs} ms` : last || `exit ${result.exitCode}`;
    super(dmKind === "timeout" ? "timeout" : dmKind === "exists" || dmKind === "busy" ? "conflict" : "dm", `${what}: ${why}`, {
      hint,
      details: { dm_kind: dmKind, command: what, exit_code: result.exitCode, timed_out: result.timedOut },
    });
    this.name = "DmError";
    this.dmKind = dmKind;
    this.result = result;
  }
}

export function classifyDmError(r: CmdResult): DmErrorKind {
  if (r.timedOut) return "timeout";
  const s = r.stderr;
  if (/File exists|already exists/i.test(s)) return "exists";
  if (/No data available|No such device|does not exist|not found|No such file/i.test(s)) return "not_found";
  if (/No space left|out of data space|ENOSPC/i.test(s)) return "no_space";
  if (/Device or resource busy|EBUSY|in use/i.test(s)) return "busy";
  return "other";
}

export function isDmError(e: unknown, kind?: DmErrorKind): e is DmError {
  return e instanceof DmError && (kind === undefined || e.dmKind === kind);
}

/** A DmError for something refused before any command ran (bad parameters, unusable state). */
export function dmRefusal(argv: string[], reason: string, hint?: string): DmError {
  return new DmError(
    "other",
    { argv, stdout: "", stderr: reason, exitCode: null, signal: null, timedOut: false, durationMs: 0 },
    hint,
  );
}
