// Benchmark, run INSIDE the test VM: what a bun process costs before any of our code — a ladder of
// tiny programs, from bare `bun -e 0` up to the built-ins every command needs — and the commands
// themselves at their cheapest (`--version`: the bundle loaded, nothing run). It says which part of
// bench:startup's fixed cost is bun's and which is ours.
//   bun run bench:startup-ladder   (= bun scripts/build.ts && bun scripts/vm.ts -- bun test/bench/startup-ladder.ts; BENCH_ROUNDS=9)
// Rounds are interleaved (every rung once, then again …) so machine noise hits every rung alike;
// the table prints medians. "in-process" is performance.now() at the program's last line: the
// time from bun's process start to the end of the program's work (exit not included).
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { freshBundle } from "../../lib/cli/start.ts";
import { median } from "../helpers/timed.ts";

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 9);
const repo = join(import.meta.dir, "../..");
// hostfs (the host's /tmp, like the repo) and tmpfs (the guest's /dev/shm): does the file system matter?
const host = mkdtempSync("/tmp/thinimg-ladder-");
const shm = mkdtempSync("/dev/shm/thinimg-ladder-");
const smolDir = join(host, "smol");
mkdirSync(smolDir);
writeFileSync(join(smolDir, "bunfig.toml"), "smol = true\n");

const report = 'Bun.write(Bun.stderr, "@" + performance.now().toFixed(1) + "\\n");';
const programs: Record<string, string> = {
  "empty.js": "",
  "empty.ts": "const x: number = 0;\nexport {};\n",
  "report.js": report,
  "fs.js": `require("node:fs");${report}`,
  "path.js": `require("node:path");${report}`,
  "util.js": `require("node:util");${report}`,
  "util-parseargs.js": `require("node:util").parseArgs({ args: ["--a", "x"], options: { a: { type: "string" } }, strict: false });${report}`,
  "sqlite.js": `const { Database } = require("bun:sqlite"); new Database(":memory:").query("select 1").get();${report}`,
  "sqlite-file.js": `const { Database } = require("bun:sqlite"); const d = new Database(process.argv[2], { create: true }); d.exec("pragma journal_mode=wal"); d.query("select 1").get();${report}`,
  "fs-path.js": `require("node:fs");require("node:path");${report}`,
  "all4.js": `require("node:fs");require("node:path");require("node:util");const { Database } = require("bun:sqlite"); new Database(":memory:").query("select 1").get();${report}`,
  "bunfile.js": `await Bun.file(process.argv[2]).text();${report}`,
  "stdout.js": `await Bun.write(Bun.stdout, "x\\n");${report}`,
  "console.js": `console.log("x");${report}`,
  "processstdout.js": `process.stdout.write("x\\n");${report}`,
  "processstderr.js": `process.stderr.write("x\\n");${report}`,
  "citty.mjs": `import { defineCommand, runCommand } from "citty"; await runCommand(defineCommand({ args: { a: { type: "string" } }, run() {} }), { rawArgs: ["--a", "x"] });${report}`,
  // the least any of unpack, list and activate loads and does: citty parses the flags, node:fs and
  // node:path, the state database opened as lib/store/db.ts opens it
  "floor.mjs": `import { defineCommand, runCommand } from "citty"; import { mkdirSync } from "node:fs"; import { dirname } from "node:path"; import { Database } from "bun:sqlite";
await runCommand(defineCommand({ args: { db: { type: "string" } }, run({ args }) { mkdirSync(dirname(args.db), { recursive: true }); const d = new Database(args.db, { create: true, strict: true }); d.exec("PRAGMA busy_timeout = 10000"); d.exec("PRAGMA journal_mode = WAL"); d.exec("PRAGMA synchronous = FULL"); d.exec("PRAGMA foreign_keys = ON"); d.query("PRAGMA user_version").get(); d.close(); } }), { rawArgs: ["--db", process.argv[2]] });${report}`,
};
for (const [name, src] of Object.entries(programs)) {
  writeFileSync(join(host, name), src);
  writeFileSync(join(shm, name), src);
}
// citty from the repo's node_modules: the program must sit where it resolves
writeFileSync(join(repo, ".build", "ladder-citty.mjs"), programs["citty.mjs"]!);
writeFileSync(join(repo, ".build", "ladder-floor.mjs"), programs["floor.mjs"]!);

async function buildJsc(name: string, src: string): Promise<string> {
  const entry = join(host, `${name}-entry.js`);
  writeFileSync(entry, src);
  const r = await Bun.build({ entrypoints: [entry], target: "bun", format: "cjs", bytecode: true, outdir: join(host, `${name}-out`) });
  if (!r.success) throw new Error(`build ${name}: ${r.logs.join("; ")}`);
  return r.outputs.find((o) => o.kind === "entry-point")!.path;
}
const emptyJsc = await buildJsc("empty", "");
const all4Jsc = await buildJsc("all4", programs["all4.js"]!);

interface Rung {
  name: string;
  argv: string[];
  cwd?: string;
}
const db = join(host, "ladder.db");
const rungs: Rung[] = [
  { name: "bun -e 0", argv: ["bun", "-e", "0"], cwd: host },
  { name: "bun -e 0 (cwd: repo, its bunfig)", argv: ["bun", "-e", "0"], cwd: repo },
  { name: "bun --smol -e 0", argv: ["bun", "--smol", "-e", "0"], cwd: host },
  { name: "bun empty.js (hostfs)", argv: ["bun", join(host, "empty.js")], cwd: host },
  { name: "bun empty.js (tmpfs)", argv: ["bun", join(shm, "empty.js")], cwd: host },
  { name: "bun empty.js (cwd: repo)", argv: ["bun", join(host, "empty.js")], cwd: repo },
  { name: "bun empty.js (bunfig smol)", argv: ["bun", join(host, "empty.js")], cwd: smolDir },
  { name: "bun empty.ts", argv: ["bun", join(host, "empty.ts")], cwd: host },
  { name: "bun empty .jsc bundle", argv: ["bun", emptyJsc], cwd: host },
  { name: "report.js (timestamp only)", argv: ["bun", join(host, "report.js")], cwd: host },
  { name: "+ node:fs", argv: ["bun", join(host, "fs.js")], cwd: host },
  { name: "+ node:path", argv: ["bun", join(host, "path.js")], cwd: host },
  { name: "+ node:util", argv: ["bun", join(host, "util.js")], cwd: host },
  { name: "+ node:util parseArgs()", argv: ["bun", join(host, "util-parseargs.js")], cwd: host },
  { name: "+ bun:sqlite :memory:", argv: ["bun", join(host, "sqlite.js")], cwd: host },
  { name: "+ bun:sqlite file, WAL", argv: ["bun", join(host, "sqlite-file.js"), db], cwd: host },
  { name: "+ fs + path", argv: ["bun", join(host, "fs-path.js")], cwd: host },
  { name: "+ fs, path, util, sqlite", argv: ["bun", join(host, "all4.js")], cwd: host },
  { name: "+ the same as .jsc bundle", argv: ["bun", all4Jsc], cwd: host },
  { name: "+ Bun.file().text()", argv: ["bun", join(host, "bunfile.js"), join(host, "empty.ts")], cwd: host },
  { name: "+ Bun.write(Bun.stdout)", argv: ["bun", join(host, "stdout.js")], cwd: host },
  { name: "+ console.log", argv: ["bun", join(host, "console.js")], cwd: host },
  { name: "+ process.stdout.write", argv: ["bun", join(host, "processstdout.js")], cwd: host },
  { name: "+ process.stderr.write", argv: ["bun", join(host, "processstderr.js")], cwd: host },
  { name: "+ citty runCommand (sources)", argv: ["bun", join(repo, ".build", "ladder-citty.mjs")], cwd: repo },
  { name: "the floor: citty + fs + path + db", argv: ["bun", join(repo, ".build", "ladder-floor.mjs"), db], cwd: repo },
  { name: "scripts/list.ts --version", argv: ["bun", "scripts/list.ts", "--version"], cwd: repo },
  { name: "scripts/unpack.ts --version", argv: ["bun", "scripts/unpack.ts", "--version"], cwd: repo },
  { name: "scripts/activate.ts --version", argv: ["bun", "scripts/activate.ts", "--version"], cwd: repo },
];

async function run(r: Rung): Promise<{ wall: number; inproc: number | null }> {
  const t0 = performance.now();
  const p = Bun.spawn(r.argv, { cwd: r.cwd ?? host, stdout: "pipe", stderr: "pipe" });
  const [, err] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  const wall = performance.now() - t0;
  if (p.exitCode !== 0) throw new Error(`${r.argv.join(" ")}: exit ${p.exitCode}: ${err.trim()}`);
  const m = /@([\d.]+)/.exec(err);
  return { wall, inproc: m ? Number(m[1]) : null };
}

try {
  const results = new Map<string, { wall: number[]; inproc: number[] }>(rungs.map((r) => [r.name, { wall: [], inproc: [] }]));
  for (const r of rungs) await run(r); // warm-up: page cache
  for (let i = 0; i < ROUNDS; i++)
    for (const r of rungs) {
      const x = await run(r);
      results.get(r.name)!.wall.push(x.wall);
      if (x.inproc !== null) results.get(r.name)!.inproc.push(x.inproc);
    }
  // a bundle goes stale when any input's ctime moves (another checkout's `bun install` re-links the
  // shared node_modules files): then the --version rungs ran the sources
  const from = ["list", "unpack", "activate"].map((n) => `${n}: ${freshBundle(n) ? "bundle" : "sources"}`).join(", ");
  const bare = median(results.get(rungs[0]!.name)!.wall);
  console.log(`\nbun start-up ladder (inside the test VM; ${ROUNDS} interleaved rounds, medians; bun ${Bun.version}; at the end ${from})`);
  console.log(`  ${"program".padEnd(34)} ${"wall".padStart(8)} ${"vs bun -e 0".padStart(12)} ${"in-process".padStart(11)}`);
  for (const r of rungs) {
    const x = results.get(r.name)!;
    const w = median(x.wall);
    const ip = x.inproc.length ? `${median(x.inproc).toFixed(0)} ms` : "";
    console.log(`  ${r.name.padEnd(34)} ${`${w.toFixed(0)} ms`.padStart(8)} ${`${(w / bare).toFixed(2)}×`.padStart(12)} ${ip.padStart(11)}`);
  }
} finally {
  rmSync(host, { recursive: true, force: true });
  rmSync(shm, { recursive: true, force: true });
  rmSync(join(repo, ".build", "ladder-citty.mjs"), { force: true });
  rmSync(join(repo, ".build", "ladder-floor.mjs"), { force: true });
}
