// Benchmark, run INSIDE the test VM: the whole CLI's fixed cost — what a command costs beyond the
// external commands it spawns — against a bare `bun -e 0` (target ≤ 1.3×).
//   bun scripts/vm.ts -- bun test/bench/startup.ts      (or `bun run bench:startup`)
// Measured, as a user runs them (`bun scripts/X.ts`, fresh processes):
//   - unpack: a re-run of an already unpacked image (no dm work by design);
//   - list --no-space (the pool status read is one `dmsetup status`);
//   - activate IMAGE: a fresh snapshot.
// Each figure is the command's wall time minus the durations of the external commands it ran, as
// they record themselves (THINIMG_CMD_LOG: one JSON record per command with duration_ms). Those are
// the dm work (and its health pre-flight) that a hand-written shell script pays too; what is left
// is bun's start, module loading, config, SQLite, locks and our own logic. Rounds are interleaved
// (bare bun, unpack, list, activate, bare bun, …) so machine noise hits every figure alike.
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { freshBundle } from "../../lib/cli/start.ts";
import { loadConfig } from "../../lib/config.ts";
import { createLoopPool } from "../../lib/dm/loop-pool.ts";
import { writeDemoImages } from "../../lib/pipeline/demo-image.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { dmAvailable } from "../helpers/kernel.ts";
import { median } from "../helpers/timed.ts";

const dm = dmAvailable();
if (!dm.ok) {
  console.error(`bench: ${dm.reason} — run it in the VM: bun scripts/vm.ts -- bun test/bench/startup.ts`);
  process.exit(2);
}

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const GiB = 1024 ** 3;
const root = mkdtempSync("/tmp/thinimg-bench-startup-");
const repo = join(import.meta.dir, "../..");
const ms = (n: number) => `${n.toFixed(0)} ms`;

interface Run {
  wall: number;
  commands: number;
  commandMs: number;
}

/** Run argv to completion (it must succeed): wall time and the external commands it recorded. */
async function run(argv: string[]): Promise<Run> {
  const cmdLog = join(root, `cmds-${Math.random().toString(36).slice(2)}.jsonl`);
  const t0 = performance.now();
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", cwd: repo, env: { ...process.env, THINIMG_CMD_LOG: cmdLog } });
  const [, stderr] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  const wall = performance.now() - t0;
  if (p.exitCode !== 0) throw new Error(`${argv.join(" ")} failed (${p.exitCode}): ${stderr.trim().split("\n").slice(-3).join(" | ")}`);
  let recs: { duration_ms: number }[] = [];
  try {
    recs = readFileSync(cmdLog, "utf8")
      .split("\n")
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { duration_ms: number });
  } catch {}
  return { wall, commands: recs.length, commandMs: recs.reduce((a, r) => a + r.duration_ms, 0) };
}

async function main(): Promise<void> {
  const pool = `bstart${process.pid}`;
  mkdirSync(join(root, "pool"));
  await createLoopPool({ dir: join(root, "pool"), name: pool, dataSize: 2 * GiB, metaSize: 64 * 1024 ** 2 });
  const stateDir = join(root, "state");
  const cfg = loadConfig({ stateDir, pool, virtualSize: "1G" }, {});
  const demo = await writeDemoImages(join(root, "images"), { scale: 1, apps: ["alpha"] });
  const source = demo.families[0]!.dir;
  const ctx = makeCtx(cfg, { command: "bench startup" });
  await unpack(ctx, { source, name: "alpha" });
  ctx.db.close();

  const common = ["--state-dir", stateDir, "--pool", pool, "--json"];
  const cases: { name: string; argv: string[] }[] = [
    { name: "bare `bun -e 0`", argv: ["bun", "-e", "0"] },
    { name: "unpack (re-run)", argv: ["bun", "scripts/unpack.ts", source, "--name", "alpha", ...common] },
    { name: "list --no-space", argv: ["bun", "scripts/list.ts", "--no-space", ...common] },
    { name: "activate", argv: ["bun", "scripts/activate.ts", "alpha", ...common] },
  ];
  const runs = new Map<string, Run[]>(cases.map((c) => [c.name, []]));
  for (const c of cases) await run(c.argv); // warm-up: page cache, the first SQLite open
  for (let i = 0; i < ROUNDS; i++) for (const c of cases) runs.get(c.name)!.push(await run(c.argv));

  const fixed = (r: Run) => r.wall - r.commandMs;
  // what ran: the start-up bundles (bun run bench:startup builds them first) or the sources
  const from = ["unpack", "list", "activate"].map((n) => `${n}: ${freshBundle(n) ? "bundle" : "sources (no current bundle)"}`).join(", ");
  const bare = median(runs.get(cases[0]!.name)!.map(fixed));
  console.log(`\nthinimg CLI start-up benchmark (inside the test VM; ${ROUNDS} interleaved rounds, medians)`);
  console.log(`  started from — ${from}`);
  console.log(`  ${"command".padEnd(18)} ${"wall".padStart(8)} ${"ext. cmds".padStart(14)} ${"fixed cost".padStart(11)}  vs bare bun`);
  for (const c of cases) {
    const rs = runs.get(c.name)!;
    const f = median(rs.map(fixed));
    const n = median(rs.map((r) => r.commands));
    const cmdMs = median(rs.map((r) => r.commandMs));
    const ratio = c === cases[0] ? "" : `${(f / bare).toFixed(2)}×  target ≤ 1.3×${f / bare <= 1.3 ? " (met)" : " (missed)"}`;
    console.log(
      `  ${c.name.padEnd(18)} ${ms(median(rs.map((r) => r.wall))).padStart(8)} ${`${n} / ${ms(cmdMs)}`.padStart(14)} ${ms(f).padStart(11)}  ${ratio}`,
    );
  }
  for (const c of cases)
    console.log(
      `  runs ${c.name}: ${runs
        .get(c.name)!
        .map((r) => ms(fixed(r)))
        .join(", ")}`,
    );
}

try {
  await main();
} finally {
  // the pool's devices end with the VM; its backing files and the images are only scratch
  rmSync(root, { recursive: true, force: true });
}
