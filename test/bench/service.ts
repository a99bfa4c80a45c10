// Benchmark, run INSIDE the test VM: an activation through the service (a signed POST /v1/activate
// over HTTP on 127.0.0.1 from an in-process client, health checks included: the service's gate on
// its background pre-flight) vs the raw dmsetup sequence an operator would run (create_snap message,
// then the table load: two dmsetup processes, spawned straight from this process, no wrapper) on the
// same top layer. ROUNDS interleaved rounds, the order alternating, each measurement after a quiet
// moment (no probe running); medians compared (target ≤ 1.2×). For continuity with older figures the
// raw sequence is also timed as one `bash -c` (a shell start on top: a less strict baseline).
// The service's side is split into its dm commands and thinimg's own work before, between and after
// them (from the command records).
//   bun scripts/vm.ts -- bun test/bench/service.ts      (or `bun run bench:service`)
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { createLoopPool } from "../../lib/dm/loop-pool.ts";
import { onCommandRecord, runOk } from "../../lib/exec.ts";
import { writeDemoImages } from "../../lib/pipeline/demo-image.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { sign } from "../../lib/server/auth.ts";
import { parseListen } from "../../lib/server/listen.ts";
import { startService } from "../../lib/server/service.ts";
import { dmAvailable } from "../helpers/kernel.ts";
import { median } from "../helpers/timed.ts";

const dm = dmAvailable();
if (!dm.ok) {
  console.error(`bench: ${dm.reason} — run it in the VM: bun scripts/vm.ts -- bun test/bench/service.ts`);
  process.exit(2);
}

const ROUNDS = 9;
const GiB = 1024 ** 3;
const root = mkdtempSync("/tmp/thinimg-bench-service-");
const SECRET = "bench-secret-0123456789abcdef";
const ms = (n: number) => `${n.toFixed(0)} ms`;

/** One process, as an operator's shell would start it (no udev in the VM). */
async function spawnOk(argv: string[]): Promise<void> {
  const p = Bun.spawn(argv, { env: { ...process.env, DM_DISABLE_UDEV: "1" }, stdout: "ignore", stderr: "pipe" });
  const err = await new Response(p.stderr).text();
  if ((await p.exited) !== 0) throw new Error(`${argv.join(" ")}: exit ${p.exitCode}: ${err}`);
}

async function main(): Promise<void> {
  await runOk(["ip", "link", "set", "lo", "up"]);
  const pool = `bsvc${process.pid}`;
  mkdirSync(join(root, "pool"));
  await createLoopPool({ dir: join(root, "pool"), name: pool, dataSize: 2 * GiB, metaSize: 64 * 1024 ** 2 });
  const cfg = loadConfig({ stateDir: join(root, "state"), pool, virtualSize: "1G" }, {});
  const demo = await writeDemoImages(join(root, "images"), { scale: 1, apps: ["alpha"] });
  const ctx = makeCtx(cfg, { command: "bench service" });
  const topThin = (await unpack(ctx, { source: demo.families[0]!.dir, name: "alpha" })).layers.at(-1)!.thin_id;
  ctx.db.close();
  writeFileSync(join(root, "secret"), SECRET);
  const s = await startService({ cfg, listen: parseListen("127.0.0.1:0"), secretFile: join(root, "secret"), allowSources: [] });
  let lastTs = Number.POSITIVE_INFINITY;
  const viaService = async () => {
    const body = JSON.stringify({ image: "alpha" });
    // distinct signatures for identical bodies: each timestamp a second before the last one at least
    lastTs = Math.min(Math.floor(Date.now() / 1000), lastTs - 1);
    const ts = String(lastTs);
    const res = await fetch(`${s.url}/v1/activate`, {
      method: "POST",
      body,
      headers: { "content-type": "application/json", "x-thinimg-timestamp": ts, "x-thinimg-signature": `sha256=${sign(SECRET, ts, body)}` },
    });
    if (res.status !== 200) throw new Error(`activate: ${res.status} ${await res.text()}`);
    return ((await res.json()) as { snapshot: { duration_ms: number } }).snapshot.duration_ms;
  };
  const table = (id: number) => `0 ${GiB / 512} thin /dev/mapper/${pool} ${id}`;
  let nextId = 200_000;
  const raw = async () => {
    const id = nextId++;
    await spawnOk(["dmsetup", "--noudevsync", "message", pool, "0", `create_snap ${id} ${topThin}`]);
    await spawnOk(["dmsetup", "--noudevsync", "create", `raw-${pool}-${id}`, "--table", table(id)]);
  };
  const rawBash = async () => {
    const id = nextId++;
    const cmd = `export DM_DISABLE_UDEV=1; dmsetup --noudevsync message ${pool} 0 "create_snap ${id} ${topThin}" && dmsetup --noudevsync create raw-${pool}-${id} --table "${table(id)}"`;
    await spawnOk(["bash", "-c", cmd]);
  };
  const kinds = { service: viaService, raw, rawBash } as const;
  const t: Record<keyof typeof kinds, number[]> = { service: [], raw: [], rawBash: [] };
  const waited: number[] = [];
  // where the service's time goes: inside the pipeline (activate()'s own clock) and in commands
  const inPipeline: number[] = [];
  const inCommands: number[] = [];
  const commandCounts: number[] = [];
  // thinimg's own work by phase, from the command records (when each ended, how long it ran):
  // before the first command (HTTP, auth, holder, gate, the intents' commit, pool section, dm queue,
  // journal), between the two, after the last (the outcome's commit, unlock, the answer)
  const phases = { before: [] as number[], between: [] as number[], after: [] as number[] };
  let spans: [number, number][] = [];
  let cmdMs = 0;
  let cmdN = 0;
  onCommandRecord((r) => {
    cmdMs += r.duration_ms;
    cmdN++;
    const end = performance.now();
    spans.push([end - r.duration_ms, end]);
  });
  try {
    await viaService(); // warm-up: the first request loads the dm modules; the gate's first probe
    for (let i = 0; i < ROUNDS; i++) {
      const order = (Object.keys(kinds) as (keyof typeof kinds)[])[i % 2 ? "reverse" : "slice"]();
      for (const k of order) {
        // a quiet start for each side: no background probe running
        await s.gate.settled();
        await Bun.sleep(150);
        const waits = s.gate.admitted.waited;
        cmdMs = 0;
        cmdN = 0;
        spans = [];
        const t0 = performance.now();
        const pipelineMs = await kinds[k]();
        const t1 = performance.now();
        t[k].push(t1 - t0);
        if (k === "service") {
          inPipeline.push(pipelineMs as number);
          inCommands.push(cmdMs);
          commandCounts.push(cmdN);
          if (spans.length === 2) {
            phases.before.push(spans[0]![0] - t0);
            phases.between.push(spans[1]![0] - spans[0]![1]);
            phases.after.push(t1 - spans[1]![1]);
          }
        }
        if (s.gate.admitted.waited > waits) waited.push(i);
      }
    }
  } finally {
    await s.stop();
  }
  const ratio = median(t.service) / median(t.raw);
  const paired = median(t.service.map((x, i) => x / t.raw[i]!));
  console.log("\nthinimg service activation benchmark (inside the test VM)");
  console.log(
    `  ${ROUNDS} interleaved rounds; health gate: last pre-flight passed and ≤ ${s.gate.maxAgeMs} ms old (probe every ${s.gate.periodMs} ms and after each dm operation)`,
  );
  console.log(`  runs: service ${t.service.map(ms).join(", ")}`);
  console.log(`        raw     ${t.raw.map(ms).join(", ")}`);
  console.log(`        bash -c ${t.rawBash.map(ms).join(", ")}`);
  if (waited.length) console.log(`  rounds whose request ran the checks itself (no passed probe within the bound): ${waited.join(", ")}`);
  console.log(`  activate via signed HTTP (health checks included), median  ${ms(median(t.service)).padStart(7)}`);
  console.log(
    `  raw dmsetup message + create (two spawns), median          ${ms(median(t.raw)).padStart(7)}   ${ratio.toFixed(2)}×  target ≤ 1.2×: ${ratio <= 1.2 ? "met" : "missed"}`,
  );
  console.log(`  per-round ratio service/raw, median ${paired.toFixed(2)}× (each request against the raw run of its round)`);
  console.log(
    `  service, medians: ${ms(median(inCommands))} in ${median(commandCounts)} commands (the dm processes), ${ms(median(inPipeline))} inside activate(), ${ms(median(t.service.map((x, i) => x - inCommands[i]!)))} outside the commands (HTTP, auth, holder, locks, DB, journal)`,
  );
  if (phases.before.length) {
    console.log(
      `  thinimg's own work by phase, medians: ${ms(median(phases.before))} before the first command, ${ms(median(phases.between))} between the two, ${ms(median(phases.after))} after the last`,
    );
  }
  console.log(
    `  the same as one bash -c, median                            ${ms(median(t.rawBash)).padStart(7)}   ${(median(t.service) / median(t.rawBash)).toFixed(2)}×`,
  );
}

try {
  await main();
} finally {
  // the pool's devices end with the VM; its backing files and the images are only scratch
  rmSync(root, { recursive: true, force: true });
}
