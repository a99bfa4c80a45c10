// --help: citty's usage text, with aliases shown as they are typed and the exit codes listed. Loaded
// only for --help (runMain imports it lazily).
import { type ArgsDef, type CommandDef, renderUsage } from "citty";
import { EXIT_CODES } from "../errors.ts";

/** What an exit code means beyond the error kinds, per command (meta.name). */
const COMMAND_CODES: Record<string, [number, string][]> = {
  gc: [[1, "something failed or needs a human (the report says what)"]],
  health: [[1, "blocked: dm work must not start (warnings alone exit 0)"]],
  "recover-pool": [[1, "a step failed or a snapshot could not be re-attached (the report says which)"]],
};

/** Commands whose exit code is someone else's: only these lines. */
const OWN_CODES: Record<string, [number, string][]> = {
  vm: [
    [0, "CMD's own exit code is passed through (0: CMD succeeded)"],
    [124, "the VM timed out and was powered off"],
    [125, "the VM did not boot or failed"],
    [2, "bad flags (before CMD)"],
  ],
  test: [
    [0, "everything passed"],
    [1, "a test, the type-check or the lint failed (or a VM did not finish)"],
    [2, "bad flags"],
  ],
};

const KIND_TEXT: Record<string, string> = {
  unhealthy: "a pre-flight health check blocked dm work",
  usage: "bad flags or arguments",
  input: "bad input: image, file, value or config",
  policy: "refused on purpose (a limit, a hostile image)",
  dm: "a device-mapper or system command failed",
  timeout: "a step timed out (never retried: it may still be running)",
  missing: "a tool, file, image or device is absent",
  conflict: "already exists, busy or locked by another process",
  internal: "internal error (a bug: the stack trace follows)",
};

export function exitCodeLines(name: string): [number, string][] {
  if (OWN_CODES[name]) return [...OWN_CODES[name]].sort((a, b) => a[0] - b[0]);
  const lines = new Map<number, string>([[0, "done"]]);
  for (const [kind, code] of Object.entries(EXIT_CODES)) lines.set(code, KIND_TEXT[kind] ?? kind);
  for (const [code, text] of COMMAND_CODES[name] ?? []) lines.set(code, text);
  return [...lines].sort((a, b) => a[0] - b[0]);
}

/** citty prints every alias with one dash (`-max-total-bytes`), which is then not accepted: a long
 * alias is typed with two. */
export function fixAliases(usage: string): string {
  // the column is right-aligned on spaces: the extra dash takes the place of one
  return usage.replace(/ (\x1b\[[0-9;]*m)?-([A-Za-z][\w-]+)(?=, )/g, "$1--$2");
}

export async function helpText(cmd: CommandDef<ArgsDef>): Promise<string> {
  const usage = fixAliases(await renderUsage(cmd));
  const meta = (typeof cmd.meta === "function" ? await cmd.meta() : await cmd.meta) ?? {};
  const codes = exitCodeLines(meta.name ?? "");
  return `${usage}\nEXIT CODES\n\n${codes.map(([c, t]) => `  ${String(c).padStart(3)}  ${t}`).join("\n")}\n`;
}
