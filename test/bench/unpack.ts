// Benchmarks for unpack and activate, run INSIDE the test VM:
//   bun scripts/vm.ts --mem 2G --timeout 1800 -- bun test/bench/unpack.ts [--scale 16] [--rss-scale 170] [--skip-rss] [--rounds 3]
// (or `bun run bench:unpack`, which does exactly that). Every figure is printed beside a baseline
// measured in the same VM run:
//   1. unpack (the CLI, as a user runs it) vs a shell script doing the same dm steps with GNU tar (target ≤ 1.1×;
//      3 interleaved rounds, each on a fresh pool, medians)
//   2. activation vs the raw dmsetup sequence (create_snap + table load)                          (target ≤ 1.2×)
//   3. re-run of an unpacked image: in-process call and whole CLI                                    (target ≤ 100 ms)
//   4. second image sharing 3 of 5 layers vs a full unpack                                          (target ≤ 0.4×)
//   5. peak RSS unpacking a ~1 GB image                                                             (target ≤ 200 MB)
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { loadConfig } from "../../lib/config.ts";
import { createLoopPool } from "../../lib/dm/loop-pool.ts";
import { runOk } from "../../lib/exec.ts";
import { activate } from "../../lib/pipeline/activate.ts";
import { writeDemoImages } from "../../lib/pipeline/demo-image.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { dmAvailable } from "../helpers/kernel.ts";
import { median, timed } from "../helpers/timed.ts";

const { values: flags } = parseArgs({
  options: {
    scale: { type: "string", default: "16" },
    "rss-scale": { type: "string", default: "170" },
    "skip-rss": { type: "boolean", default: false },
    rounds: { type: "string", default: "3" },
  },
});
const dm = dmAvailable();
if (!dm.ok) {
  console.error(`bench: ${dm.reason} — run it in the VM: bun scripts/vm.ts --mem 2G -- bun test/bench/unpack.ts`);
  process.exit(2);
}

const GiB = 1024 ** 3;
const VSIZE = 10 * GiB;
const root = mkdtempSync("/tmp/thinimg-bench-unpack-");
const repo = join(import.meta.dir, "../..");
const results: { name: string; value: string; baseline: string; ratio: string; target: string }[] = [];
const ms = (n: number) => `${n.toFixed(0)} ms`;
const cli = (pool: string, stateDir: string, script: string, ...args: string[]) => [
  "bun",
  join(repo, "scripts", script),
  ...args,
  "--pool",
  pool,
  "--state-dir",
  stateDir,
  "--json",
];

/** Untimed, before each timed run: no dirty pages left by the run before. The pool's loop device
 * writes into its backing file's page cache, and that writeback to the host would otherwise land on
 * whichever run goes second (a second run's mkfs measured up to 2× slower than a first run's). */
function settle(): void {
  if (Bun.spawnSync(["sync"]).exitCode !== 0) throw new Error("sync failed");
}

function layersOf(dir: string): string[] {
  return readdirSync(dir)
    .filter((f) => /^\d+\.tar$/.test(f))
    .sort((a, b) => Number.parseInt(a, 10) - Number.parseInt(b, 10))
    .map((f) => join(dir, f));
}

/** The same dm steps as thinimg's unpack, by hand: the baseline a careful operator would script. */
function shellUnpackScript(pool: string, layers: string[], firstId: number, mnt: string): string {
  const sectors = VSIZE / 512;
  const lines = ["set -e", "export DM_DISABLE_UDEV=1", `mkdir -p ${mnt}`];
  layers.forEach((tar, i) => {
    const id = firstId + i;
    const name = `bench-${pool}-${id}`;
    lines.push(
      i === 0 ? `dmsetup --noudevsync message ${pool} 0 "create_thin ${id}"` : `dmsetup --noudevsync message ${pool} 0 "create_snap ${id} ${id - 1}"`,
      `dmsetup --noudevsync create ${name} --table "0 ${sectors} thin /dev/mapper/${pool} ${id}"`,
      ...(i === 0 ? [`mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/${name}`] : []),
      `mount -o nosuid,nodev,noatime /dev/mapper/${name} ${mnt}`,
      `tar -x -p --same-owner --numeric-owner --xattrs --xattrs-include='*' -f ${tar} -C ${mnt}`,
      `sync -f ${mnt}`,
      `umount ${mnt}`,
      `dmsetup --noudevsync remove ${name}`,
    );
  });
  return lines.join("\n");
}

/** Where the last round's unpack spent its wall time, from its command records: before its first
 * command (bun, modules, config, locks, the health checks' reads), the transaction-id journal's
 * commands, the apply (from each `mount` to its `sync -f`: in-process, no command runs), the other
 * commands, and thinimg's own work between commands. */
function wallPhases(recs: { command: string; duration_ms: number; started_at: string }[], spawnedAt: number, wallMs: number): string {
  const start = (r: (typeof recs)[number]) => Date.parse(r.started_at);
  const journal = recs.filter((r) => / status /.test(` ${r.command} `) || / set_transaction_id /.test(r.command));
  let apply = 0;
  let gaps = 0;
  for (const [i, r] of recs.entries()) {
    const prev = recs[i - 1];
    if (!prev) continue;
    const gap = start(r) - (start(prev) + prev.duration_ms);
    if (prev.command.startsWith("mount ") && r.command.startsWith("sync -f")) apply += gap;
    else gaps += gap;
  }
  const sum = (rs: typeof recs) => rs.reduce((a, r) => a + r.duration_ms, 0);
  const before = start(recs[0]!) - spawnedAt;
  const last = recs.at(-1)!;
  const after = spawnedAt + wallMs - (start(last) + last.duration_ms);
  return [
    `last round's unpack, ${ms(wallMs)} wall: ${ms(before)} before its first command;`,
    `  the transaction-id journal and pre-flight reads: ${journal.length} commands, ${ms(sum(journal))} (${journal.filter((r) => r.command.includes("set_transaction_id")).length} set_transaction_id);`,
    `  the apply (mount → sync -f, in-process): ${ms(apply)}; the other ${recs.length - journal.length} commands: ${ms(sum(recs) - sum(journal))};`,
    `  thinimg's own work between commands: ${ms(gaps)}; after the last command (commit, exit): ${ms(after)}`,
  ].join("\n");
}

async function main() {
  const scale = Number(flags.scale);
  console.error(`bench: generating images (scale ${scale}) under ${root}`);
  const imgs = await writeDemoImages(join(root, "img"), { scale, apps: ["alpha", "beta"] });
  const [alpha, beta] = imgs.families as [{ name: string; dir: string }, { name: string; dir: string }];
  // Warm the page cache for both readers alike.
  for (const f of [...layersOf(alpha.dir), ...layersOf(beta.dir)]) await Bun.file(f).arrayBuffer();

  // 1. full unpack vs shell + GNU tar (same layers, same pool, other thin ids), interleaved rounds
  // (each on a fresh pool and state dir, the order alternating); medians reported
  const rounds = Number(flags.rounds);
  const shellMs: number[] = [];
  const fullMs: number[] = [];
  let pool = "";
  let stateDir = "";
  let cmdLog = "";
  let spawnedAt = 0;
  for (let r = 0; r < rounds; r++) {
    pool = `bench${process.pid}r${r}`;
    mkdirSync(join(root, `pool-${r}`));
    await createLoopPool({ dir: join(root, `pool-${r}`), name: pool, dataSize: 8 * GiB, metaSize: 128 * 1024 ** 2 });
    stateDir = join(root, `state-${r}`);
    cmdLog = join(root, `cmd-${r}.log`);
    const runShell = async () => {
      settle();
      shellMs.push((await timed(["bash", "-c", shellUnpackScript(pool, layersOf(alpha.dir), 100_000, join(root, `mnt-shell-${r}`))])).ms);
    };
    const runOurs = async () => {
      settle();
      spawnedAt = Date.now();
      fullMs.push((await timed(cli(pool, stateDir, "unpack.ts", alpha.dir, "--name", "alpha"), { THINIMG_CMD_LOG: cmdLog })).ms);
    };
    if (r % 2 === 0) {
      await runShell();
      await runOurs();
    } else {
      await runOurs();
      await runShell();
    }
    console.error(`bench: round ${r + 1}/${rounds}: unpack ${ms(fullMs.at(-1)!)}, shell ${ms(shellMs.at(-1)!)}`);
  }
  const full = { ms: median(fullMs) };
  const shell = { ms: median(shellMs) };
  const recs = readFileSync(cmdLog, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as { command: string; duration_ms: number; started_at: string });
  const byTool = new Map<string, { n: number; ms: number }>();
  for (const r of recs) {
    const tool =
      r.command.split(" ").filter((w) => !w.startsWith("-"))[0] === "dmsetup"
        ? `dmsetup ${r.command.split(" ").find((w, i) => i > 0 && !w.startsWith("-"))}`
        : r.command.split(" ")[0]!;
    const t = byTool.get(tool) ?? { n: 0, ms: 0 };
    t.n++;
    t.ms += r.duration_ms;
    byTool.set(tool, t);
  }
  const shellCmds = shellUnpackScript(pool, layersOf(alpha.dir), 0, "/x").split("\n").length - 3;
  results.push({
    name: `unpack 5 layers (${(imgs.bytes[0]! / 1024 ** 2).toFixed(0)} MiB of tar), median of ${rounds}`,
    value: ms(full.ms),
    baseline: `${ms(shell.ms)} shell+GNU tar`,
    ratio: `${(full.ms / shell.ms).toFixed(2)}×`,
    target: "≤ 1.1×",
  });
  console.log(`\nrounds: unpack ${fullMs.map(ms).join(", ")}; shell ${shellMs.map(ms).join(", ")}`);
  console.log(
    `last round's unpack ran ${recs.length} external commands (${ms(recs.reduce((a, r) => a + r.duration_ms, 0))}); the shell baseline runs ${shellCmds}:`,
  );
  for (const [tool, t] of [...byTool].sort((a, b) => b[1].ms - a[1].ms))
    console.log(`  ${tool.padEnd(24)} ${String(t.n).padStart(4)}×  ${ms(t.ms).padStart(9)}`);
  console.log(wallPhases(recs, spawnedAt, fullMs.at(-1)!));

  // 3. re-run: whole CLI, and the in-process call (what the CLI does after bun has started)
  const rerunCli = await timed(cli(pool, stateDir, "unpack.ts", alpha.dir, "--name", "alpha"));
  const cfg = loadConfig({ stateDir, pool });
  const ctx = makeCtx(cfg, { command: "bench" });
  const r0 = performance.now();
  const again = await unpack(ctx, { source: alpha.dir, name: "alpha" });
  const rerunInProc = performance.now() - r0;
  if (again.dm_work) throw new Error("re-run did dm work");
  const bunStart = await timed(["bun", "-e", "0"]);
  results.push({
    name: "re-run of an unpacked image (in-process)",
    value: ms(rerunInProc),
    baseline: "-",
    ratio: "-",
    target: "≤ 100 ms",
  });
  results.push({
    name: "re-run of an unpacked image (whole CLI)",
    value: ms(rerunCli.ms),
    baseline: `${ms(bunStart.ms)} bare \`bun -e 0\``,
    ratio: `${(rerunCli.ms / bunStart.ms).toFixed(2)}×`,
    target: "≤ 100 ms + runtime start",
  });

  // 4. second image sharing layers 1-3
  const second = await timed(cli(pool, stateDir, "unpack.ts", beta.dir, "--name", "beta"));
  const j = JSON.parse(second.stdout) as { reused: number; built: number };
  results.push({
    name: `second image sharing 3 of 5 layers (reused ${j.reused}, built ${j.built})`,
    value: ms(second.ms),
    baseline: `${ms(full.ms)} full unpack`,
    ratio: `${(second.ms / full.ms).toFixed(2)}×`,
    target: "≤ 0.4×",
  });

  // 2. activation vs raw dmsetup (best of 5 each; same top layer)
  const topThin = (await unpack(ctx, { source: alpha.dir, name: "alpha" })).layers.at(-1)!.thin_id;
  const ours: number[] = [];
  const raw: number[] = [];
  for (let i = 0; i < 5; i++) {
    const id = 200_000 + i;
    const t0 = performance.now();
    await runOk([
      "bash",
      "-c",
      `export DM_DISABLE_UDEV=1; dmsetup --noudevsync message ${pool} 0 "create_snap ${id} ${topThin}" && dmsetup --noudevsync create raw-${pool}-${id} --table "0 ${VSIZE / 512} thin /dev/mapper/${pool} ${id}"`,
    ]);
    raw.push(performance.now() - t0);
    const t1 = performance.now();
    await activate(ctx, "alpha");
    ours.push(performance.now() - t1);
  }
  const best = (a: number[]) => Math.min(...a);
  results.push({
    name: "activate (in-process; incl. health checks)",
    value: ms(best(ours)),
    baseline: `${ms(best(raw))} raw dmsetup`,
    ratio: `${(best(ours) / best(raw)).toFixed(2)}×`,
    target: "≤ 1.2×",
  });
  const t2 = performance.now();
  for (let i = 0; i < 3; i++) await activate(ctx, "alpha", { skipHealth: true });
  const noHealth = (performance.now() - t2) / 3;
  results.push({
    name: "activate (in-process, health checks skipped)",
    value: ms(noHealth),
    baseline: `${ms(best(raw))} raw dmsetup`,
    ratio: `${(noHealth / best(raw)).toFixed(2)}×`,
    target: "-",
  });
  ctx.db.close();

  // 5. peak RSS on a ~1 GB image
  if (!flags["skip-rss"]) {
    const big = await writeDemoImages(join(root, "big"), { scale: Number(flags["rss-scale"]), apps: ["gamma"] });
    const gamma = big.families[0]!;
    const r = await timed(cli(pool, stateDir, "unpack.ts", gamma.dir, "--name", "gamma"));
    results.push({
      name: `peak RSS unpacking ${(big.bytes[0]! / 1024 ** 3).toFixed(2)} GiB image`,
      value: `${(r.peakRssKb / 1024).toFixed(0)} MB`,
      baseline: `${(bunStart.peakRssKb / 1024).toFixed(0)} MB bare bun`,
      ratio: "-",
      target: "≤ 200 MB",
    });
  }

  console.log("\nthinimg unpack/activate benchmark (inside the test VM)");
  const w = Math.max(...results.map((r) => r.name.length));
  for (const r of results) console.log(`  ${r.name.padEnd(w)}  ${r.value.padStart(9)}  vs ${r.baseline.padEnd(32)} ${r.ratio.padStart(6)}  target ${r.target}`);
}

try {
  await main();
} finally {
  // the pool's devices end with the VM; its backing files and the images are only scratch
  rmSync(root, { recursive: true, force: true });
}
