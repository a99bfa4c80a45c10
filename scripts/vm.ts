// bun scripts/vm.ts [--mem 1G] [--timeout 600] [--verbose] -- CMD ARG...
// Run one command inside a User-Mode Linux VM with a real dm-thin kernel (see lib/vm/uml.ts).
import { defineCommand } from "citty";
import { runMain } from "../lib/cli/main.ts";
import { usageError } from "../lib/errors.ts";
import { parseDuration } from "../lib/util/units.ts";
import { DEFAULT_VM_MEM, runInVm, tail, VmError } from "../lib/vm/uml.ts";

const VALUE_FLAGS = new Set(["--mem", "--timeout"]);

/** Our flags come first; the command starts after `--` or at the first non-flag word. (Bun itself
 *  swallows a `--` right after the script name, so `vm.ts -- sh -c x` arrives as `sh -c x`.) */
export function splitArgs(raw: string[]): { own: string[]; command: string[] } {
  let i = 0;
  while (i < raw.length) {
    const a = raw[i]!;
    if (a === "--") return { own: raw.slice(0, i), command: raw.slice(i + 1) };
    if (!a.startsWith("-")) break;
    i += VALUE_FLAGS.has(a) ? 2 : 1;
  }
  return { own: raw.slice(0, i), command: raw.slice(i) };
}

const { own, command } = splitArgs(process.argv.slice(2));

export const vmCommand = defineCommand({
  meta: {
    name: "vm",
    description:
      "bun scripts/vm.ts [OPTIONS] -- CMD ARG... — run CMD inside a User-Mode Linux VM (real dm-thin, loop, dm-flakey, dm-delay; host files; cwd and safelisted env carried in). Exit code is CMD's; 124 on timeout; 125 when the VM fails.",
  },
  args: {
    mem: { type: "string", description: "VM memory (bun and the test suite run in 128M; more leaves room for page cache)", default: DEFAULT_VM_MEM },
    timeout: { type: "string", description: "Limit for the whole run incl. boot (e.g. 600, 10m); exit 124 when hit", default: "600" },
    verbose: { type: "boolean", alias: "v", description: "Stream kernel console messages to stderr", default: false },
    keep: { type: "boolean", description: "Keep the per-run directory under /tmp (debugging)", default: false },
  },
  async run({ args }) {
    if (command.length === 0) throw usageError("no command given", "usage: bun scripts/vm.ts [--mem 1G] [--timeout 600] -- CMD ARG...");
    const timeoutMs = parseDuration(args.timeout, "--timeout");
    try {
      const r = await runInVm({
        argv: command,
        mem: args.mem,
        timeoutMs,
        stdout: (c) => process.stdout.write(c),
        stderr: (c) => process.stderr.write(c),
        ...(args.verbose ? { kernel: (c: Uint8Array) => process.stderr.write(c) } : {}),
        keep: args.keep,
      });
      if (r.timedOut) {
        process.stderr.write(`vm: ${command.join(" ")}: timed out after ${args.timeout}; VM powered off\n`);
        if (args.verbose) process.stderr.write(`${tail(r.kernelLog, 20)}\n`);
        process.exitCode = 124;
        return;
      }
      if (args.keep) process.stderr.write(`vm: run directory kept: ${r.runDir}\n`);
      process.exitCode = r.exitCode ?? 125;
    } catch (e) {
      if (e instanceof VmError && !args.verbose) process.stderr.write(`--- kernel log (tail) ---\n${tail(e.kernelLog, 30)}\n---\n`);
      throw e;
    }
  },
});

if (import.meta.main) await runMain(vmCommand, own);
