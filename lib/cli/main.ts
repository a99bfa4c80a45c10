// Our runMain: citty's prints stack traces for every error and accepts unknown flags silently.
// Here a ThinimgError becomes one line (message — hint) and its exit code; unknown flags are refused;
// --version prints the version and acts on nothing; help has colour only on a terminal.
import { type ArgsDef, type CommandDef, runCommand } from "citty";
import { errorEnvelope, fromErrno, ThinimgError, usageError } from "../errors.ts";
import { log, setLogFormat, setLogLevel } from "../log.ts";
import { isTerminal } from "../util/tty.ts";
import { THINIMG_VERSION } from "../version.ts";
import type { CommandName } from "./schemas.ts";

/** Colour and indentation are for a person at a terminal; pipes and journald get plain, compact text. */
const forTerminal = () => isTerminal(1) && !process.env.NO_COLOR;

/** What a command's flags are: every accepted name, the names that take a value, its positionals. */
interface FlagSpec {
  known: Set<string>;
  takesValue: Set<string>;
  positionals: [string, ArgsDef[string]][];
}

async function flagSpec(cmd: CommandDef<ArgsDef>): Promise<FlagSpec> {
  const args = (typeof cmd.args === "function" ? await cmd.args() : await cmd.args) ?? {};
  const spec: FlagSpec = { known: new Set(["help", "h", "version"]), takesValue: new Set(), positionals: [] };
  for (const [name, def] of Object.entries(args)) {
    if (def.type === "positional") {
      spec.positionals.push([name, def]);
      continue;
    }
    const alias = "alias" in def ? def.alias : undefined;
    // citty accepts camelCase too
    const names = [name, name.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase()), ...(Array.isArray(alias) ? alias : alias ? [alias] : [])];
    for (const n of names) spec.known.add(n);
    if (def.type === "boolean") spec.known.add(`no-${name}`);
    else for (const n of names) spec.takesValue.add(n);
  }
  return spec;
}

/** A word that is a flag, not a value: `-5` is a negative number, `-` stands for stdin. */
const isFlag = (a: string) => a.startsWith("-") && a !== "-" && !/^-\d/.test(a);

function rejectUnknown(rawArgs: string[], known: Set<string>): void {
  for (const a of rawArgs) {
    if (a === "--") break;
    if (!isFlag(a)) continue;
    const name = a.replace(/^--?/, "").split("=")[0]!;
    if (a.startsWith("--") ? !known.has(name) : ![...name].every((c) => known.has(c))) {
      throw usageError(`unknown option ${a.split("=")[0]}`);
    }
  }
}

/** The value-taking flag a word names, with its inline value (`--pool=x`), if it has one: a long
 * flag, a short one, or the last letter of a short cluster (`-vt X`: t takes X). */
function valueFlag(a: string, takesValue: Set<string>): { flag: string; inline: string | undefined } | null {
  if (!isFlag(a)) return null;
  const [body, inline] = a.replace(/^--?/, "").split(/=(.*)/s) as [string, string | undefined];
  const long = a.startsWith("--");
  const name = long || inline !== undefined ? body : body.slice(-1);
  if (!takesValue.has(name)) return null;
  return { flag: long ? `--${name}` : `-${name}`, inline };
}

/**
 * Refuse a flag that takes a value but has none: citty would make `--pool` (last word, or `--pool=`)
 * an empty string, i.e. the default pool, and `--state-dir --json` a state dir named "--json".
 */
function rejectMissingValues(rawArgs: string[], takesValue: Set<string>): void {
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    if (a === "--") break;
    const v = valueFlag(a, takesValue);
    if (!v) continue;
    const { flag } = v;
    if (v.inline !== undefined) {
      if (v.inline === "") throw usageError(`${flag}= has an empty value`, `write ${flag}=VALUE or ${flag} VALUE`);
      continue;
    }
    const next = rawArgs[i + 1];
    if (next === undefined || isFlag(next)) {
      const found = next === undefined ? "" : ` (found ${next} where it should be)`;
      throw usageError(`${flag} needs a value${found}`, `write ${flag} VALUE${flag.startsWith("--") ? ` or ${flag}=VALUE` : ""}; see --help`);
    }
    i++;
  }
}

/**
 * Refuse positional words the command does not define (`health.ts --host-only stray`, `recover-pool
 * --dir X create`): citty would silently accept them. Flags that take a value (string, enum…)
 * consume the next word unless written --flag=value. An optional last positional (test filters)
 * takes any number of words.
 */
function rejectStrayPositionals(spec: FlagSpec, rawArgs: string[]): void {
  const { positionals, takesValue } = spec;
  const last = positionals.at(-1)?.[1];
  const variadic = last !== undefined && "required" in last && last.required === false;
  const words: string[] = [];
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    if (a === "--") {
      words.push(...rawArgs.slice(i + 1));
      break;
    }
    if (isFlag(a)) {
      const v = valueFlag(a, takesValue);
      if (v && v.inline === undefined) i++; // its value
      continue;
    }
    words.push(a);
  }
  if (variadic || words.length <= positionals.length) return;
  const extra = words[positionals.length]!;
  const expected = positionals.length === 0 ? "takes no positional arguments" : `takes ${positionals.map(([n]) => n.toUpperCase()).join(" ")}`;
  throw usageError(`unexpected argument ${JSON.stringify(extra)}: this command ${expected}`);
}

/** Print an error the way every script does: one line, exit code from the error. */
export function reportError(e: unknown, json: boolean): number {
  if (e instanceof ThinimgError) {
    if (json) {
      process.stdout.write(`${JSON.stringify(errorEnvelope(e))}\n`);
    }
    process.stderr.write(`error: ${e.oneLine()}\n`);
    return e.exitCode;
  }
  // A bug: keep the stack, it is what a developer needs.
  process.stderr.write(`internal error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  return 70;
}

export async function runMain<T extends ArgsDef>(cmd: CommandDef<T>, rawArgs = process.argv.slice(2)): Promise<never> {
  const json = rawArgs.includes("--json");
  try {
    const lf = rawArgs.findIndex((a) => a === "--log-format" || a.startsWith("--log-format="));
    if (lf >= 0) {
      const v = rawArgs[lf]!.includes("=") ? rawArgs[lf]!.split("=")[1] : rawArgs[lf + 1];
      if (v === "json" || v === "human") setLogFormat(v);
    }
    if (rawArgs.includes("--verbose") || rawArgs.includes("-v")) setLogLevel("debug");
    if (rawArgs.includes("--help") || rawArgs.includes("-h")) {
      const { helpText } = await import("./help.ts");
      const usage = await helpText(cmd as CommandDef<ArgsDef>);
      await Bun.write(Bun.stdout, `${forTerminal() ? usage : Bun.stripANSI(usage)}\n`);
      process.exit(0);
    }
    if (rawArgs.includes("--version")) {
      await Bun.write(Bun.stdout, `thinimg ${THINIMG_VERSION}\n`);
      process.exit(0);
    }
    const spec = await flagSpec(cmd as CommandDef<ArgsDef>);
    rejectUnknown(rawArgs, spec.known);
    rejectMissingValues(rawArgs, spec.takesValue);
    rejectStrayPositionals(spec, rawArgs);
    await runCommand(cmd, { rawArgs });
    await flushStdout();
    process.exit(process.exitCode ?? 0);
  } catch (e) {
    // citty's own errors (missing required positional, bad enum) are usage errors
    // a filesystem errno error (EACCES, EROFS, ENOSPC, ENOENT…) is the operator's, not a bug: one
    // line; its stack stays available with --verbose
    const err = e instanceof Error && e.name === "CLIError" ? usageError(e.message.replace(/\.$/, "")) : (fromErrno(e) ?? e);
    log.debug(e);
    await flushStdout();
    process.exit(reportError(err, json));
  }
}

// Writes still in flight: process.exit() would cut a piped stdout off at the pipe buffer (64 KiB).
const pendingWrites: Promise<unknown>[] = [];

/** A JSON document as printed: indented on a terminal, one line otherwise (pipes, journald). */
export function jsonText(data: unknown): string {
  return `${forTerminal() ? JSON.stringify(data, null, 2) : JSON.stringify(data)}\n`;
}

/** Tests run with THINIMG_CHECK_JSON=1: a document that is not its command's documented shape
 * (lib/cli/schemas.ts) fails the command (exit 70) instead of reaching stdout. */
async function checkShape(command: CommandName | undefined, data: unknown): Promise<boolean> {
  if (process.env.THINIMG_CHECK_JSON !== "1" || command === undefined) return true;
  const { outputProblems } = await import("./schemas.ts");
  const problems = outputProblems(command, data);
  if (!problems) return true;
  process.stderr.write(`internal error: the JSON output of ${command} does not match its schema (lib/cli/schemas.ts): ${problems}\n`);
  process.exitCode = 70;
  return false;
}

/** Write a JSON document to stdout (the only thing that goes there); runMain waits for it. `command`
 * names its documented schema (benchmarks and test helpers print undocumented ones). */
export function printJson(data: unknown, command?: CommandName): void {
  pendingWrites.push(checkShape(command, data).then((ok) => (ok ? Bun.write(Bun.stdout, jsonText(data)) : 0)));
}

/** Write a command's text output to stdout; runMain waits for it. Not process.stdout.write: building
 * that stream loads bun's stream classes, a measurable part of a short command in the VM. One call
 * per command (concurrent writes are not ordered). */
export function printText(text: string): void {
  pendingWrites.push(Bun.write(Bun.stdout, text));
}

async function flushStdout(): Promise<void> {
  await Promise.allSettled(pendingWrites.splice(0));
}
