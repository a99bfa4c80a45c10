// The step log of one recover-pool run. Every action is recorded with the exact command it stands
// for, so a dry run prints a shell script an operator could run by hand, and a real run reports
// what it did. Actions run only when not in dry-run; checks (read-only) always run.
import { ThinimgError } from "../errors.ts";

export type StepStatus = "done" | "planned" | "ok" | "failed" | "skipped";

export interface Step {
  name: string;
  status: StepStatus;
  /** The command as argv (the equivalent command for in-process actions), or null. */
  argv: string[] | null;
  /** The same as one shell line (shell variables stand for devices not attached yet in a dry run). */
  command: string | null;
  detail: string | null;
}

const SAFE = /^[A-Za-z0-9_/.:=,+@%-]+$/;
/** Only safe characters, spaces and $VARS: double quotes keep the variables expandable. */
const WITH_VARS = /^(?:[A-Za-z0-9_/.:=,+@% -]|\$[A-Z_]+)+$/;

/** Quote one argument for a POSIX shell; "$VAR" placeholders (dry-run devices) stay expandable. */
export function shellArg(a: string): string {
  if (a === "") return "''";
  if (SAFE.test(a)) return a;
  if (a.includes("$") && WITH_VARS.test(a)) return `"${a}"`;
  return `'${a.replace(/'/g, `'\\''`)}'`;
}

export function shellLine(argv: string[], assign?: string, env?: Record<string, string>): string {
  const cmd = [...Object.entries(env ?? {}).map(([k, v]) => `${k}=${shellArg(v)}`), ...argv.map(shellArg)].join(" ");
  return assign ? `${assign}=$(${cmd})` : cmd;
}

export interface ActOptions<T> {
  argv?: string[] | null;
  /** Shell variable the command's output is assigned to (a device attached in this run). */
  assign?: string;
  env?: Record<string, string>;
  /** Value standing for the result in a dry run (e.g. "$META_DEV"). */
  planned: T;
  /** Detail once done, from the result. */
  done?: (r: T) => string;
  /** Shell form when it is not simply argv (e.g. a command with a comment, or a pipeline). */
  shell?: string;
}

export class Runbook {
  readonly steps: Step[] = [];
  /** Commands the operator should run next (blocked runs). */
  nextSteps: string[] = [];

  constructor(readonly dryRun: boolean) {}

  /** A check or observation (always runs; changes nothing). */
  note(name: string, detail: string, status: StepStatus = "ok", argv: string[] | null = null): void {
    this.steps.push({ name, status, argv, command: argv ? shellLine(argv) : null, detail });
  }

  /** A state change: performed unless dry-run; recorded either way. */
  async act<T>(name: string, detail: string, o: ActOptions<T>, fn: () => Promise<T> | T): Promise<T> {
    const argv = o.argv ?? null;
    const step: Step = {
      name,
      status: "planned",
      argv,
      command: o.shell ?? (argv ? shellLine(argv, o.assign, o.env) : null),
      detail,
    };
    this.steps.push(step);
    if (this.dryRun) return o.planned;
    try {
      const r = await fn();
      step.status = "done";
      if (o.done) step.detail = o.done(r);
      return r;
    } catch (e) {
      step.status = "failed";
      step.detail = `${detail}: ${e instanceof ThinimgError ? e.message : String(e)}`;
      throw e;
    }
  }

  /** The commands planned in a dry run, as a shell script body. */
  plannedScript(): string[] {
    return this.steps.filter((s) => s.status === "planned" && s.command).map((s) => s.command!);
  }
}

/** A run that stops: the operator gets the reason, the hint, and the commands to run next. */
export class Blocked extends ThinimgError {
  readonly nextSteps: string[];
  constructor(kind: ThinimgError["kind"], message: string, hint: string, nextSteps: string[] = []) {
    super(kind, message, { hint });
    this.name = "Blocked";
    this.nextSteps = nextSteps;
  }
}

/**
 * How a new backing file is made (makeBackingFile): fallocate; a sparse truncate ONLY where the
 * filesystem says "Operation not supported". Not `a || b`: that would also paper over ENOSPC.
 */
export function sizeFileShell(size: number, path: string): string {
  return `${shellLine(["fallocate", "-l", String(size), path])}   # only if it says "Operation not supported": ${shellLine(["truncate", "-s", String(size), path])}`;
}
