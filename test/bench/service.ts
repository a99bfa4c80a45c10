// Benchmark, run INSIDE the test VM: an activation through the service (a signed POST /v1/activate
// over HTTP on 127.0.0.1, health checks included) vs the raw dmsetup sequence (create_snap + table
// load) on the same top layer, 5 runs each interleaved, medians compared (target ≤ 1.2×).
//   bun scripts/vm.ts -- bun test/bench/service.ts      (or `bun run bench:service`)
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { createLoopPool } from "../../lib/dm/loop-pool.ts";
import { runOk } from "../../lib/exec.ts";
import { writeDemoImages } from "../../lib/pipeline/demo-image.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { sign } from "../../lib/server/auth.ts";
import { parseListen } from "../../lib/server/listen.ts";
import { startService } from "../../lib/server/service.ts";
import { dmAvailable } from "../helpers/kernel.ts";

const dm = dmAvailable();
if (!dm.ok) {
  console.error(`bench: ${dm.reason} — run it in the VM: bun scripts/vm.ts -- bun test/bench/service.ts`);
  process.exit(2);
}

const GiB = 1024 ** 3;
const root = mkdtempSync("/tmp/thinimg-bench-service-");
const SECRET = "bench-secret-0123456789abcdef";
const ms = (n: number) => `${n.toFixed(0)} ms`;
const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;

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
  const activateOverHttp = async () => {
    const body = JSON.stringify({ image: "alpha" });
    const ts = String(Math.floor(Date.now() / 1000));
    const res = await fetch(`${s.url}/v1/activate`, {
      method: "POST",
      body,
      headers: { "content-type": "application/json", "x-thinimg-timestamp": ts, "x-thinimg-signature": `sha256=${sign(SECRET, ts, body)}` },
    });
    if (res.status !== 200) throw new Error(`activate: ${res.status} ${await res.text()}`);
  };
  const ours: number[] = [];
  const raw: number[] = [];
  try {
    await activateOverHttp(); // warm-up: the first request loads the dm and health modules
    for (let i = 0; i < 5; i++) {
      const id = 200_000 + i;
      const t0 = performance.now();
      await runOk([
        "bash",
        "-c",
        `export DM_DISABLE_UDEV=1; dmsetup --noudevsync message ${pool} 0 "create_snap ${id} ${topThin}" && dmsetup --noudevsync create raw-${pool}-${id} --table "0 ${GiB / 512} thin /dev/mapper/${pool} ${id}"`,
      ]);
      raw.push(performance.now() - t0);
      // distinct signatures: each request is signed a second apart from the last
      await Bun.sleep(1_000);
      const t1 = performance.now();
      await activateOverHttp();
      ours.push(performance.now() - t1);
    }
  } finally {
    await s.stop();
  }
  console.log("\nthinimg service activation benchmark (inside the test VM)");
  console.log(`  runs: service ${ours.map(ms).join(", ")}; raw ${raw.map(ms).join(", ")}`);
  console.log(
    `  activate via signed HTTP (incl. health checks), median  ${ms(median(ours)).padStart(7)}  vs ${ms(median(raw))} raw dmsetup  ${(median(ours) / median(raw)).toFixed(2)}×  target ≤ 1.2×`,
  );
}

try {
  await main();
} finally {
  // the pool's devices end with the VM; its backing files and the images are only scratch
  rmSync(root, { recursive: true, force: true });
}
