// Benchmark helpers: a median, and one command run to completion with its wall time and peak RSS.
import { readFileSync } from "node:fs";
import { join } from "node:path";

const repo = join(import.meta.dir, "../..");

/** The median (the mean of the two middle values for an even count). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Run a command to completion (cwd: the repo); wall time, CPU time (user + system, its reaped
 * children included) and the child's peak RSS (VmHWM, polled). */
export async function timed(argv: string[], env: Record<string, string> = {}): Promise<{ ms: number; cpuMs: number; peakRssKb: number; stdout: string }> {
  const t0 = performance.now();
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", env: { ...process.env, ...env }, cwd: repo });
  let peak = 0;
  const poll = setInterval(() => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${p.pid}/status`, "utf8"));
      if (m) peak = Math.max(peak, Number(m[1]));
    } catch {}
  }, 20);
  const [stdout, stderr] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  clearInterval(poll);
  const elapsed = performance.now() - t0;
  if (p.exitCode !== 0) throw new Error(`${argv.join(" ")} failed (${p.exitCode}): ${stderr.trim().split("\n").slice(-3).join(" | ")}`);
  const cpu = p.resourceUsage()?.cpuTime;
  return { ms: elapsed, cpuMs: cpu ? Number(cpu.total) / 1000 : Number.NaN, peakRssKb: peak, stdout };
}
