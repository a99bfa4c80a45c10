// dm failures typed from the command's stderr and exit status, so callers decide on a kind
// ("already exists", "gone", "busy", …) instead of matching message strings themselves.
import type { ErrorKind } from "../errors.ts";
import { type CmdResult, CommandError, type RunOptions, run } from "../exec.ts";

export type DmErrorKind =
  | "exists"
  | "not_found"
  | "busy"
  | "no_space"
  | "timeout"
  /** The tool is not installed (exit 127 / could not start), or the kernel has no device-mapper. */
  | "missing"
  /** I/O error or read-only filesystem under the command. */
  | "io"
  | "other";

/** The CLI error kind (and exit code) for a dm failure: dmsetup's "exists"/"busy" are conflicts. */
function errorKindFor(dmKind: DmErrorKind): ErrorKind {
  if (dmKind === "timeout") return "timeout";
  if (dmKind === "missing") return "missing";
  if (dmKind === "exists" || dmKind === "busy") return "conflict";
  return "dm";
}

const MISSING_HINT =
  "install the tool (apt-get install dmsetup thin-provisioning-tools, or bash scripts/setup.sh) and make sure the kernel has device-mapper (modprobe dm-thin-pool)";

export class DmError extends CommandError {
  readonly dmKind: DmErrorKind;
  /** o.kind: the CLI kind (default from dmKind); o.commandMessage: keep CommandError's message
   * ("argv: exit N: last stderr line") instead of dmsetup's shorter one. */
  constructor(dmKind: DmErrorKind, result: CmdResult, hint?: string, o: { kind?: ErrorKind; commandMessage?: boolean } = {}) {
    const what = result.argv.join(" ");
    const last =
      result.stderr
        .trim()
        .split("\n")
        .filter((l) => l && l !== "Command failed.")
        .at(-1) ?? "";
    const why = result.timedOut ? `timed out after ${result.durationMs} ms` : last || `exit ${result.exitCode}`;
    super(result, hint ?? (dmKind === "missing" ? MISSING_HINT : undefined), {
      kind: o.kind ?? errorKindFor(dmKind),
      ...(o.commandMessage ? {} : { message: `${what}: ${why}` }),
      details: {
        dm_kind: dmKind,
        command: what,
        exit_code: result.exitCode,
        timed_out: result.timedOut,
        ...(o.commandMessage ? { stderr: result.stderr } : {}),
      },
    });
    this.name = "DmError";
    this.dmKind = dmKind;
  }
}

/**
 * Type a failed command from its exit status and stderr. Order matters: a command that could not
 * run (exit 127: "Executable not found in $PATH") or a kernel without device-mapper
 * ("/dev/mapper/control: open failed: No such device") is "missing" — never "not_found", which
 * must only mean "that device / thin id / file is not there" (callers treat it as an answer).
 */
export function classifyDmError(r: CmdResult): DmErrorKind {
  if (r.timedOut) return "timeout";
  const s = r.stderr;
  if (r.exitCode === 127) return "missing";
  if (/\/dev\/mapper\/control|kernel device-mapper driver|device-mapper driver .*(missing|not loaded)/i.test(s)) return "missing";
  if (/Input\/output error|\bEIO\b|Read-only file system|\bEROFS\b/i.test(s)) return "io";
  if (/No space left|out of data space|ENOSPC/i.test(s)) return "no_space";
  if (/File exists|already exists/i.test(s)) return "exists";
  const tool = (r.argv[0] ?? "").split("/").at(-1) ?? "";
  if (tool === "dmsetup" || tool.startsWith("thin_")) {
    // dmsetup: "Device does not exist." (info/status/table), ENXIO on remove/suspend, ENODATA for a
    // pool message naming an absent thin id
    if (/Device (\S+ )?does not exist|No such device or address|No data available|ioctl on .* failed: No such device\s*$/im.test(s)) {
      return "not_found";
    }
  } else if (/No such file or directory|No such device or address|does not exist|not mounted|no mount point specified|mountpoint not found/i.test(s)) {
    // losetup / mount / umount / mkfs: the file, device or mount point is not there
    return "not_found";
  }
  if (/Device or resource busy|EBUSY|target is busy|device is busy|in use/i.test(s)) return "busy";
  return "other";
}

/** The typed error for a failed losetup/mount/umount/mkfs: like DmError, but keeping the CLI kind
 * those wrappers have always had (CommandError's "dm"/"timeout"; "missing" for an absent tool). */
export function toolError(r: CmdResult, hint?: string): DmError {
  const dmKind = classifyDmError(r);
  return new DmError(dmKind, r, hint, { kind: dmKind === "timeout" ? "timeout" : dmKind === "missing" ? "missing" : "dm", commandMessage: true });
}

/** run(), throwing a typed DmError (busy, not_found, no_space, io, timeout, missing…) unless exit 0;
 * for losetup, mount, umount and mkfs (dmsetup has its own wrapper). */
export async function runTool(argv: string[], opts?: RunOptions): Promise<CmdResult> {
  const r = await run(argv, opts);
  if (r.timedOut || r.exitCode !== 0) throw toolError(r);
  return r;
}

export function isDmError(e: unknown, kind?: DmErrorKind): e is DmError {
  return e instanceof DmError && (kind === undefined || e.dmKind === kind);
}

/** A DmError for something refused before any command ran (bad parameters, unusable state). */
export function dmRefusal(argv: string[], reason: string, hint?: string): DmError {
  return new DmError("other", { argv, stdout: "", stderr: reason, exitCode: null, signal: null, timedOut: false, durationMs: 0 }, hint);
}
