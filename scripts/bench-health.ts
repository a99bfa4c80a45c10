// bun scripts/bench-health.ts [--runs 30] [--pool NAME | --host-only]
// The whole pre-flight health check on a healthy host, N runs: median / p95 against the 50 ms
// target, and against a baseline measured in the same process — one bare `dmsetup status <pool>`
// (the least any pool check must do) — so numbers from a slow VM and a real host compare.
// Without --pool (and with device-mapper available) it makes a small loop-backed pool in /tmp and
// removes it afterwards. In development: bun scripts/vm.ts -- bun scripts/bench-health.ts
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { defineCommand } from "citty";
import { outputArgs } from "../lib/cli/args.ts";
import { printJson, runMain } from "../lib/cli/main.ts";
import { createLoopPool, dmsetup, losetup } from "../lib/dm/index.ts";
import { ThinimgError } from "../lib/errors.ts";
import { runHealthChecks } from "../lib/health/index.ts";
import { setLogLevel } from "../lib/log.ts";
import { parseIntArg } from "../lib/util/units.ts";

const TARGET_MS = 50;

function stats(xs: number[]) {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.ceil(p * s.length) - 1)]!;
  const r = (n: number) => Math.round(n * 10) / 10;
  return { median: r(q(0.5)), p95: r(q(0.95)), min: r(s[0]!), max: r(s.at(-1)!) };
}

async function time(fn: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

/** The pool to check: the given one, none with --host-only, else a temporary loop-backed pool in
 * stateDir; and how to remove what was made. */
async function benchPool(stateDir: string, given: string | null, hostOnly: boolean): Promise<{ poolName: string | null; cleanup: () => Promise<void> }> {
  let poolName = given;
  let cleanup = async () => {};
  if (!hostOnly && !poolName) {
    const p = await createLoopPool({ dir: stateDir, name: `bench${process.pid}`, dataSize: 256 * 1024 ** 2, metaSize: 8 * 1024 ** 2 });
    poolName = p.name;
    cleanup = async () => {
      await dmsetup.remove(p.name);
      await losetup.detach(p.metaDev);
      await losetup.detach(p.dataDev);
    };
  }
  return { poolName, cleanup };
}

/** 3 warm-up runs, then `runs` interleaved runs of the baseline and the whole health check. */
async function measure(pool: string | null, stateDir: string, runs: number) {
  const baselineArgv = pool ? ["dmsetup", "status", pool] : null;
  const baseline = async () => {
    if (baselineArgv) {
      const p = Bun.spawn(baselineArgv, { stdout: "pipe", stderr: "pipe", env: { ...process.env, DM_DISABLE_UDEV: "1" } });
      await new Response(p.stdout).text();
      if ((await p.exited) !== 0) throw new ThinimgError("dm", `${baselineArgv.join(" ")} failed`);
    } else await Bun.file("/proc/meminfo").text();
  };
  const check = async () => {
    const r = await runHealthChecks({ pool, stateDir });
    if (!r.healthy) {
      const b = r.checks.find((c) => c.status === "block")!;
      throw new ThinimgError("unhealthy", `host is not healthy, cannot benchmark: ${b.name}: ${b.message}`, { hint: b.runbook });
    }
    return r;
  };
  for (let i = 0; i < 3; i++) {
    await baseline();
    await check();
  }
  const base: number[] = [];
  const health: number[] = [];
  const perCheck: Record<string, number[]> = {};
  // interleaved, so drift (other load, caches) hits both series alike
  for (let i = 0; i < runs; i++) {
    base.push(await time(baseline));
    const t = performance.now();
    const r = await check();
    health.push(performance.now() - t);
    for (const c of r.checks) {
      const key = c.name.startsWith("pool.") ? "pool.*" : c.name;
      perCheck[key] = [...(perCheck[key] ?? []), c.durationMs];
    }
  }
  const h = stats(health);
  const b = stats(base);
  return {
    runs,
    pool,
    target_ms: TARGET_MS,
    health_ms: h,
    baseline: { what: baselineArgv ? baselineArgv.join(" ") : "read /proc/meminfo", ms: b },
    ratio_median: Math.round((h.median / b.median) * 100) / 100,
    overhead_median_ms: Math.round((h.median - b.median) * 10) / 10,
    per_check_median_ms: Object.fromEntries(Object.entries(perCheck).map(([k, v]) => [k, stats(v).median])),
    meets_target: h.median <= TARGET_MS,
  };
}

function printReport(out: Awaited<ReturnType<typeof measure>>, json: boolean): void {
  if (json) printJson(out);
  else {
    const { pool, runs, health_ms: h } = out;
    const b = out.baseline.ms;
    const lines = [
      `health check (${pool ? `pool ${pool}` : "host only"}), ${runs} runs:  median ${h.median} ms  p95 ${h.p95} ms  (min ${h.min}, max ${h.max})  target ≤ ${TARGET_MS} ms: ${out.meets_target ? "met" : "NOT met"}`,
      `baseline ${out.baseline.what}:  median ${b.median} ms  p95 ${b.p95} ms`,
      `ratio health/baseline (median): ${out.ratio_median}x   overhead over baseline: ${out.overhead_median_ms} ms`,
      `per check (median ms, concurrent): ${Object.entries(out.per_check_median_ms)
        .map(([k, v]) => `${k} ${v}`)
        .join(", ")}`,
    ];
    process.stdout.write(`${lines.join("\n")}\n`);
  }
}

export const benchHealthCommand = defineCommand({
  meta: { name: "bench-health", description: "Benchmark the pre-flight health check (target ≤ 50 ms) against a bare dmsetup status" },
  args: {
    runs: { type: "string", description: "Measured runs (after 3 warm-up runs)", default: "30" },
    pool: { type: "string", description: "Existing pool to check (default: a temporary loop-backed pool)" },
    "host-only": { type: "boolean", description: "No pool: host checks only, baseline is reading /proc/meminfo", default: false },
    ...outputArgs,
  },
  async run({ args }) {
    if (!args.verbose) setLogLevel("error");
    const runs = parseIntArg(args.runs, "--runs", { min: 1, max: 10_000 });
    const hostOnly = args["host-only"];
    if (!hostOnly && !existsSync("/dev/mapper/control")) {
      throw new ThinimgError("missing", "device-mapper is not available here", {
        hint: "run it in the test VM (bun scripts/vm.ts -- bun scripts/bench-health.ts) or pass --host-only",
      });
    }
    const stateDir = mkdtempSync("/tmp/thinimg-bench-health-");
    const { poolName, cleanup } = await benchPool(stateDir, args.pool ?? null, hostOnly);
    try {
      printReport(await measure(hostOnly ? null : poolName, stateDir, runs), Boolean(args.json));
    } finally {
      await cleanup();
      rmSync(stateDir, { recursive: true, force: true });
    }
  },
});

if (import.meta.main) await runMain(benchHealthCommand);
