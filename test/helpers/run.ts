// Run a command the way a user does and collect what it said: the one "spawn, wait, read both
// outputs" for every test that drives thinimg's scripts (or the VM) as a subprocess.
import { join } from "node:path";
import type { CmdResult } from "../../lib/exec.ts";

export const ROOT = join(import.meta.dir, "../..");

export interface Ran {
  code: number;
  out: string;
  err: string;
}

export interface RunOptions {
  cwd?: string;
  env?: Record<string, string | undefined>;
}

export async function run(argv: string[], o: RunOptions = {}): Promise<Ran> {
  const p = Bun.spawn(argv, { cwd: o.cwd ?? ROOT, env: o.env ?? process.env, stdout: "pipe", stderr: "pipe", stdin: "ignore" });
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  return { code, out, err };
}

/** One boot of the test VM running a shell script (files under /tmp are the host's). */
export function vmBoot(script: string): Promise<Ran> {
  return run(["bun", "scripts/vm.ts", "--", "sh", "-c", script]);
}

/** A fake command result for a fake runner (unit tests of parsing and decisions). */
export function cmdResult(argv: string[], o: Partial<Omit<CmdResult, "argv">> = {}): CmdResult {
  return { argv, stdout: "", stderr: "", exitCode: 0, signal: null, timedOut: false, durationMs: 1, ...o };
}
