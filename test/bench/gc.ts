// GC benchmark, in the test VM (real dm-thin):
//   bun scripts/build.ts gc && bun scripts/vm.ts --timeout 1800 -- bun test/bench/gc.ts [--count 1000] [--rounds 3]
//   (or `bun run bench:gc`; the build gives gc its start-up bundle, as scripts/setup.sh does on a host)
//
// A pool with COUNT thin ids, half of them orphaned: COUNT/2 live (committed layers in the DB),
// COUNT/4 released snapshots (ledger: orphaned), COUNT/4 unknown to the DB (made behind thinimg's
// back). Every id maps 2 data blocks. The metadata is written with thin_restore before the pool is
// loaded, so setting up 1,000 ids costs one command instead of 1,000 pool messages.
// Measured: `bun scripts/gc.ts` (dry-run) and `bun scripts/gc.ts --force`, as a user runs them
// (process start, health checks and report included), against a baseline in the same VM: a raw
// sequential loop of `dmsetup message <pool> 0 "delete N"` over the same ids on an identical pool.
// --rounds R (default 3) rounds on fresh pools, each with its baseline split around its --force
// run; the medians are printed.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freshBundle } from "../../lib/cli/start.ts";
import { loadConfig } from "../../lib/config.ts";
import { pool as dmpool, dmsetup, losetup, thintools } from "../../lib/dm/index.ts";
import { makeBackingFile } from "../../lib/dm/loop-pool.ts";
import { udevArgs } from "../../lib/dm/udev.ts";
import { runOk } from "../../lib/exec.ts";
import type { GcReport } from "../../lib/gc/report.ts";
import { openDb, tx } from "../../lib/store/db.ts";
import { parseIntArg } from "../../lib/util/units.ts";
import { median } from "../helpers/timed.ts";

const argv = process.argv.slice(2);
const ci = argv.indexOf("--count");
const COUNT = ci >= 0 ? parseIntArg(argv[ci + 1] ?? "", "--count", { min: 8, max: 100_000 }) : 1000;
if (COUNT % 4 !== 0) throw new Error("--count must be a multiple of 4");
const LIVE = COUNT / 2;
const RELEASED = COUNT / 4;
const BLOCK_SECTORS = 128; // 64 KiB
const DATA_BLOCKS = Math.max(8192, COUNT * 2 + 1024);
const HOUR = 3_600_000;

if (process.getuid?.() !== 0 || !existsSync("/dev/mapper/control")) {
  console.error("run inside the VM: bun scripts/vm.ts --timeout 1800 -- bun test/bench/gc.ts");
  process.exit(1);
}

/** thin_dump-format XML: ids 1..COUNT, each mapping 2 blocks of its own. */
function metadataXml(): string {
  const out = [`<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="${BLOCK_SECTORS}" nr_data_blocks="${DATA_BLOCKS}">`];
  for (let id = 1; id <= COUNT; id++) {
    out.push(`  <device dev_id="${id}" mapped_blocks="2" transaction="0" creation_time="0" snap_time="0">`);
    out.push(`    <range_mapping origin_begin="0" data_begin="${(id - 1) * 2}" length="2" time="0"/>`);
    out.push("  </device>");
  }
  out.push("</superblock>");
  return `${out.join("\n")}\n`;
}

interface BenchPool {
  name: string;
  dir: string;
  metaDev: string;
  dataDev: string;
}

async function makePool(tag: string, xml: string): Promise<BenchPool> {
  const dir = mkdtempSync(`/tmp/thinimg-bench-gc-${tag}-`);
  const name = `bgc${process.pid}${tag}`;
  const meta = join(dir, "metadata.img");
  const data = join(dir, "data.img");
  await makeBackingFile(meta, 64 * 1024 ** 2);
  await makeBackingFile(data, DATA_BLOCKS * BLOCK_SECTORS * 512);
  writeFileSync(join(dir, "meta.xml"), xml);
  const metaDev = await losetup.attach(meta);
  // onto the loop device: thin_restore opens with O_DIRECT, which hostfs files refuse
  await runOk(["thin_restore", "-q", "-i", join(dir, "meta.xml"), "-o", metaDev], { timeoutMs: 120_000 });
  const dataDev = await losetup.attach(data);
  await dmsetup.create(
    name,
    dmpool.poolTable({
      metaDev,
      dataDev,
      dataSectors: DATA_BLOCKS * BLOCK_SECTORS,
      blockSectors: BLOCK_SECTORS,
      lowWaterMark: 64,
      features: ["error_if_no_space"],
    }),
  );
  return { name, dir, metaDev, dataDev };
}

async function destroy(p: BenchPool): Promise<void> {
  await dmsetup.remove(p.name).catch(() => {});
  await losetup.detach(p.metaDev).catch(() => {});
  await losetup.detach(p.dataDev).catch(() => {});
  rmSync(p.dir, { recursive: true, force: true });
}

async function countIds(p: BenchPool): Promise<number> {
  await dmpool.reserveMetadataSnap(p.name);
  try {
    return (await thintools.thinLs(p.metaDev, { metadataSnap: true })).length;
  } finally {
    await dmpool.releaseMetadataSnap(p.name);
  }
}

function seedDb(stateDir: string, pool: string): void {
  const cfg = loadConfig({ stateDir, pool });
  const db = openDb(cfg.dbPath);
  const t = Date.now() - HOUR;
  tx(db, () => {
    db.query("INSERT INTO images (id, pool, name, source, state, created_at, updated_at) VALUES (1, ?, 'bench', '/dev/null', 'ready', ?, ?)").run(pool, t, t);
    const layer = db.query(
      "INSERT INTO layers (id, pool, chain_id, identity, digest, size, thin_id, device_name, virtual_size, state, phase, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, 1073741824, 'committed', 'committed', ?, ?)",
    );
    const ledger = db.query(
      "INSERT INTO thin_ids (pool, thin_id, owner_kind, owner_id, state, reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    );
    const snap = db.query(
      "INSERT INTO snapshots (id, pool, image_id, layer_id, thin_id, device_name, state, created_at, updated_at, released_at) VALUES (?, ?, 1, 1, ?, ?, 'released', ?, ?, ?)",
    );
    for (let id = 1; id <= LIVE; id++) {
      ledger.run(pool, id, "layer", id, "committed", null, t, t);
      layer.run(id, pool, `sha256:${id}`, `sha256:${id}`, `sha256:${id}`, id, `thinimg-${pool}-layer-${id}`, t, t);
    }
    for (let id = LIVE + 1; id <= LIVE + RELEASED; id++) {
      ledger.run(pool, id, "snapshot", id, "orphaned", "released", t, t);
      snap.run(id, pool, id, `thinimg-${pool}-snap-${id}`, t, t, t);
    }
    // ids LIVE+RELEASED+1..COUNT: in the pool, unknown to the DB
    // the DB recorded the pool's last change (transaction 1 in the restored metadata): it is not
    // behind the pool, so GC may treat the ids it does not know as orphans
    db.query(
      "INSERT INTO work (id, pool, kind, subject, state, pid, host, command, created_at, updated_at, finished_at) VALUES (1, ?, 'build_layer', 'layer:1', 'done', 1, 'bench', 'bench', ?, ?, ?)",
    ).run(pool, t, t, t);
    db.query(
      "INSERT INTO steps (work_id, pool, name, state, thin_id, txn_before, txn_after, created_at, updated_at) VALUES (1, ?, 'create_thin', 'done', ?, 0, 1, ?, ?)",
    ).run(pool, LIVE, t, t);
  });
  db.close();
}

interface GcRun {
  ms: number;
  r: GcReport;
  code: number;
  /** command → [calls, total ms] from the structured command records */
  cmds: Map<string, [number, number]>;
  /** Where the wall time went: spawn → first delete sent, first delete → last delete's end, → exit. */
  phases: { beforeMs: number; deletesSpanMs: number; afterMs: number } | null;
  /** The commands before the first delete: "+start s command (duration)", from the spawn. */
  timeline: string[];
  /** The gc process's RSS (MB), sampled every 0.5 s. */
  rssMb: number[];
}

/** Split a run's wall time around its deletes, from the records' start times and durations. */
function phasesOf(recs: { command: string; duration_ms: number; started_at: string }[], spawnedAt: number, exitedAt: number): GcRun["phases"] {
  const dels = recs.filter((r) => / message \S+ 0 delete \d+$/.test(r.command));
  if (!dels.length) return null;
  const first = Date.parse(dels[0]!.started_at);
  const last = dels.at(-1)!;
  const end = Date.parse(last.started_at) + last.duration_ms;
  return { beforeMs: first - spawnedAt, deletesSpanMs: end - first, afterMs: exitedAt - end };
}

function readFileOr(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

function timelineOf(recs: { command: string; duration_ms: number; started_at: string }[], spawnedAt: number): string[] {
  const out: string[] = [];
  for (const r of recs) {
    if (/ message \S+ 0 delete \d+$/.test(r.command)) break;
    const w = r.command.split(" ").filter((x) => !x.startsWith("--noudev") && !x.startsWith("/"));
    out.push(`+${((Date.parse(r.started_at) - spawnedAt) / 1000).toFixed(2)} ${w.slice(0, w[1] === "message" ? 5 : 2).join(" ")} (${r.duration_ms})`);
  }
  return out;
}

async function gc(p: BenchPool, stateDir: string, force: boolean): Promise<GcRun> {
  const cmdLog = join(stateDir, `cmd-${force ? "force" : "dry"}-${Date.now()}.jsonl`);
  const t0 = performance.now();
  const spawnedAt = Date.now();
  const proc = Bun.spawn(["bun", "scripts/gc.ts", "--json", "--pool", p.name, "--state-dir", stateDir, "--grace", "0", ...(force ? ["--force"] : [])], {
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, THINIMG_LOG_LEVEL: "error", THINIMG_CMD_LOG: cmdLog },
  });
  // the gc process's RSS (a spawn's cost in the VM grows with its parent's memory), twice a second
  const rss: number[] = [];
  const sampler = setInterval(() => {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileOr(`/proc/${proc.pid}/status`));
    if (m) rss.push(Number(m[1]) / 1024);
  }, 500);
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearInterval(sampler);
  const ms = performance.now() - t0;
  const exitedAt = Date.now();
  const cmds = new Map<string, [number, number]>();
  const recs: { command: string; duration_ms: number; started_at: string }[] = [];
  if (existsSync(cmdLog)) {
    for (const line of readFileSync(cmdLog, "utf8").split("\n")) {
      if (!line) continue;
      const rec = JSON.parse(line) as { command: string; duration_ms: number; started_at: string };
      recs.push(rec);
      const w = rec.command.split(" ").filter((x) => !x.startsWith("--noudev"));
      const k = w[0] === "dmsetup" ? `dmsetup ${w[1] === "message" ? `message ${(w[4] ?? "").split(" ")[0]}` : w[1]}` : (w[0] ?? "?");
      const c = cmds.get(k) ?? [0, 0];
      cmds.set(k, [c[0] + 1, c[1] + rec.duration_ms]);
    }
  }
  try {
    return { ms, r: JSON.parse(out) as GcReport, code, cmds, phases: phasesOf(recs, spawnedAt, exitedAt), timeline: timelineOf(recs, spawnedAt), rssMb: rss };
  } catch {
    writeFileSync(`${cmdLog}.stdout`, out);
    throw new Error(
      `gc${force ? " --force" : ""} exit ${code}: stdout not JSON (${out.length} chars, kept in ${cmdLog}.stdout): ${out.slice(0, 200)} … ${out.slice(-200)}\n${err}`,
    );
  }
}

const cmdSummary = (g: GcRun) =>
  [...g.cmds.entries()]
    .sort((x, y) => y[1][1] - x[1][1])
    .map(([k, [n, ms]]) => `${k} ×${n} ${fmt(ms)}`)
    .join(", ");

/** The baseline: what deleting these ids costs with nothing around it. */
async function rawDeletes(p: BenchPool, ids: number[]): Promise<number> {
  const u = udevArgs();
  const env = { ...process.env, ...u.env };
  const t0 = performance.now();
  for (const id of ids) {
    const proc = Bun.spawn(["dmsetup", ...u.flags, "message", p.name, "0", `delete ${id}`], { stdout: "ignore", stderr: "pipe", env });
    if ((await proc.exited) !== 0) throw new Error(`delete ${id}: ${await new Response(proc.stderr).text()}`);
  }
  return performance.now() - t0;
}

const fmt = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

interface Round {
  dryMs: number;
  forceMs: number;
  /** --force's own duration_ms (process start and exit excluded) */
  forceInsideMs: number;
  baseMs: number;
  ownDeletesMs: number;
  force: GcRun;
  dry: GcRun;
  againMs: number;
}

const ORPHANS = COUNT - LIVE;

/** One round on fresh pools: dry-run, then the raw baseline split around the --force run so that a
 * drift in the host's load hits both alike. */
async function round(i: number, xml: string): Promise<Round> {
  const a = await makePool(`a${i}`, xml);
  const b = await makePool(`b${i}`, xml);
  const stateDir = mkdtempSync("/tmp/thinimg-bench-gc-state-");
  try {
    seedDb(stateDir, a.name);
    const orphanIds = Array.from({ length: ORPHANS }, (_, k) => LIVE + 1 + k);
    const before = await dmpool.poolStatusOk(a.name);
    const dry = await gc(a, stateDir, false);
    if (dry.r.orphans.length !== ORPHANS) throw new Error(`dry-run found ${dry.r.orphans.length} orphans, expected ${ORPHANS}`);
    if ((await countIds(a)) !== COUNT) throw new Error("dry-run changed the pool");
    const half = Math.floor(orphanIds.length / 2);
    const base1 = await rawDeletes(b, orphanIds.slice(0, half));
    const force = await gc(a, stateDir, true);
    const base2 = await rawDeletes(b, orphanIds.slice(half));
    const done = force.r.orphans.filter((o) => o.outcome === "done").length;
    const left = await countIds(a);
    const after = await dmpool.poolStatusOk(a.name);
    if (done !== ORPHANS || left !== LIVE) throw new Error(`--force removed ${done}, ${left} ids left (expected ${LIVE})`);
    if (after.dataUsed !== before.dataUsed - ORPHANS * 2)
      throw new Error(`data use ${before.dataUsed} → ${after.dataUsed}: the deletes did not free their blocks`);
    const again = await gc(a, stateDir, true);
    if (again.r.orphans.length !== 0) throw new Error(`a second --force found ${again.r.orphans.length} orphans`);
    const r: Round = {
      dryMs: dry.ms,
      forceMs: force.ms,
      forceInsideMs: force.r.duration_ms,
      baseMs: base1 + base2,
      ownDeletesMs: force.cmds.get("dmsetup message delete")?.[1] ?? 0,
      force,
      dry,
      againMs: again.ms,
    };
    const perId = (ms: number) => `${(ms / ORPHANS).toFixed(1)} ms/id`;
    console.log(
      `round ${i}: --force ${fmt(r.forceMs)} (${perId(r.forceMs)}; ${fmt(r.forceInsideMs)} inside gc), baseline ${fmt(r.baseMs)} (${perId(r.baseMs)}; ${fmt(base1)} before, ${fmt(base2)} after), ratio ${(r.forceMs / r.baseMs).toFixed(2)}x; dry-run ${fmt(r.dryMs)}; second --force ${fmt(r.againMs)}`,
    );
    return r;
  } finally {
    await destroy(a);
    await destroy(b);
    rmSync(stateDir, { recursive: true, force: true });
  }
}

const ri = argv.indexOf("--rounds");
const ROUNDS = ri >= 0 ? parseIntArg(argv[ri + 1] ?? "", "--rounds", { min: 1, max: 20 }) : 3;
const xml = metadataXml();
console.log(`gc starts from ${freshBundle("gc") ? "its bundle" : "the sources (no current bundle: bun scripts/build.ts gc)"}`);
console.log(`pool: ${COUNT} thin ids (${LIVE} live, ${RELEASED} released snapshots, ${COUNT - LIVE - RELEASED} unknown to the DB); ${ROUNDS} rounds`);
const rounds: Round[] = [];
for (let i = 1; i <= ROUNDS; i++) rounds.push(await round(i, xml));

const med = (f: (r: Round) => number) => median(rounds.map(f));
const n = ORPHANS;
const last = rounds.at(-1)!;
console.log(`median of ${ROUNDS} rounds (${n} orphans each):`);
console.log(`dry-run:   ${fmt(med((r) => r.dryMs))} wall`);
console.log(
  `--force:   ${fmt(med((r) => r.forceMs))} wall, ${(med((r) => r.forceMs) / n).toFixed(1)} ms/id (${(med((r) => r.forceInsideMs) / n).toFixed(1)} ms/id inside gc)`,
);
console.log(`baseline:  ${fmt(med((r) => r.baseMs))} for ${n} raw \`dmsetup message delete\` (${(med((r) => r.baseMs) / n).toFixed(1)} ms/id)`);
console.log(
  `ratio:     --force / baseline = ${med((r) => r.forceMs / r.baseMs).toFixed(2)}x wall (median of the rounds' ratios), ${med((r) => r.forceInsideMs / r.baseMs).toFixed(2)}x inside gc`,
);
// drift-proof: the same run's own delete commands, timed by lib/exec, against the whole run
console.log(
  `overhead:  --force inside gc / its own ${n} delete commands = ${med((r) => r.forceInsideMs / r.ownDeletesMs).toFixed(2)}x (${fmt(med((r) => r.forceInsideMs - r.ownDeletesMs))} for scans, health, pool checks, ledger)`,
);
console.log(`commands (last round): dry-run: ${cmdSummary(last.dry)}`);
console.log(`                       --force: ${cmdSummary(last.force)}`);
// where --force's wall time goes: before its first delete (start-up, locks, health, scans, plan),
// the deletes (their commands, and GC's own work between them: claims, journal, queue, pool checks),
// after the last (ledger flush, report, exit)
const ph = (f: (p: NonNullable<GcRun["phases"]>) => number) => med((r) => (r.force.phases ? f(r.force.phases) : Number.NaN));
console.log(
  `phases:    before the first delete ${fmt(ph((p) => p.beforeMs))}; deletes ${fmt(ph((p) => p.deletesSpanMs))} (${(ph((p) => p.deletesSpanMs) / n).toFixed(1)} ms/id, of which GC's own between its delete commands ${(med((r) => (r.force.phases ? r.force.phases.deletesSpanMs - r.ownDeletesMs : Number.NaN)) / n).toFixed(1)} ms/id); after the last ${fmt(ph((p) => p.afterMs))}`,
);
console.log(`before the first delete (last round, s from spawn, command (ms)): ${last.force.timeline.join(", ")}`);
const rssOf = (g: GcRun) => (g.rssMb.length ? `median ${median(g.rssMb).toFixed(0)} MB, max ${Math.max(...g.rssMb).toFixed(0)} MB` : "not sampled");
console.log(
  `rss:       --force (last round) ${rssOf(last.force)}; this benchmark process (the raw loop's parent) ${(process.memoryUsage().rss / 1024 ** 2).toFixed(0)} MB`,
);
