// Streamed S3 → unpacked image, run INSIDE the test VM:
//   bun scripts/vm.ts --mem 2G --timeout 1800 -- bun test/bench/pipeline.ts [--scale 16] [--rate 50] [--rounds 3] [--rss-scale 170] [--skip-rss]
// (or `bun run bench:pipeline`). A local S3 (npm s3rver, in this process) sits behind a throttling
// proxy (one token bucket for all connections: the link, at --rate MB/s). In each round, on fresh
// pools and state dirs, in rotating order:
//   download alone   the image's objects fetched into an empty blob cache (what a resolve without
//                    streaming does: 4 at a time), in a child bun process
//   apply alone      `unpack` of the same layer family from a local directory
//   end to end       `unpack s3://…/` (streamed: layer N applies while it downloads, N+1 downloads)
// and prints the medians: end to end vs the larger of the other two (target ≤ 1.10×), then the peak
// RSS of a streamed unpack of a ~1 GiB image (target ≤ 100 MB).
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { createLoopPool } from "../../lib/dm/loop-pool.ts";
import { runOk } from "../../lib/exec.ts";
import { writeDemoImages } from "../../lib/pipeline/demo-image.ts";
import { dmAvailable } from "../helpers/kernel.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";
import { median, timed } from "../helpers/timed.ts";

const { values: flags } = parseArgs({
  options: {
    scale: { type: "string", default: "16" },
    rate: { type: "string", default: "50" },
    rounds: { type: "string", default: "3" },
    "rss-scale": { type: "string", default: "170" },
    "skip-rss": { type: "boolean", default: false },
  },
});
const dm = dmAvailable();
if (!dm.ok) {
  console.error(`bench: ${dm.reason} — run it in the VM: bun run bench:pipeline`);
  process.exit(2);
}

const GiB = 1024 ** 3;
const root = mkdtempSync("/tmp/thinimg-bench-pipeline-");
const repo = join(import.meta.dir, "../..");
const ms = (n: number) => `${n.toFixed(0)} ms`;

/** A proxy in front of S3 that passes at most `rate` bytes/s of response bodies, over all connections. */
function throttlingProxy(upstream: string, rate: number): { url: string; stop(): void } {
  let next = performance.now(); // when the link is free again
  const SLICE = 64 * 1024;
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 0,
    async fetch(req) {
      const u = new URL(req.url);
      const headers = new Headers(req.headers);
      headers.delete("host");
      const res = await fetch(`${upstream}${u.pathname}${u.search}`, { method: req.method, headers, decompress: false, redirect: "manual" });
      if (!res.body) return new Response(null, { status: res.status, headers: res.headers });
      const reader = res.body.getReader();
      let pending = new Uint8Array(0);
      const body = new ReadableStream<Uint8Array>({
        async pull(c) {
          if (pending.length === 0) {
            const r = await reader.read();
            if (r.done) return c.close();
            pending = r.value;
          }
          const part = pending.subarray(0, SLICE);
          pending = pending.subarray(part.length);
          const now = performance.now();
          next = Math.max(next, now) + (part.length / rate) * 1000;
          if (next - now > 1) await Bun.sleep(next - now);
          c.enqueue(part);
        },
        cancel: (r) => reader.cancel(r),
      });
      return new Response(body, { status: res.status, headers: res.headers });
    },
  });
  return { url: `http://127.0.0.1:${server.port}`, stop: () => server.stop(true) };
}

function layersOf(dir: string): string[] {
  return readdirSync(dir)
    .filter((f) => /^\d+\.tar$/.test(f))
    .sort((a, b) => Number.parseInt(a, 10) - Number.parseInt(b, 10));
}

async function upload(s3: TestS3, prefix: string, dir: string): Promise<void> {
  for (const f of layersOf(dir)) await s3.put("bench", `${prefix}/${f}`, Bun.file(join(dir, f)) as unknown as Uint8Array);
}

let poolN = 0;
async function freshPool(): Promise<{ pool: string; stateDir: string }> {
  const n = ++poolN;
  const pool = `bp${process.pid}n${n}`;
  mkdirSync(join(root, `pool-${n}`));
  await createLoopPool({ dir: join(root, `pool-${n}`), name: pool, dataSize: 8 * GiB, metaSize: 128 * 1024 ** 2 });
  return { pool, stateDir: join(root, `state-${n}`) };
}

const unpackCli = (p: { pool: string; stateDir: string }, source: string) => [
  "bun",
  join(repo, "scripts", "unpack.ts"),
  source,
  "--name",
  "img",
  "--pool",
  p.pool,
  "--state-dir",
  p.stateDir,
  "--json",
];

async function main() {
  await runOk(["ip", "link", "set", "lo", "up"]);
  const scale = Number(flags.scale);
  const rate = Number(flags.rate) * 1e6;
  const rounds = Number(flags.rounds);
  console.error(`bench: generating the image (scale ${scale}) under ${root}`);
  const imgs = await writeDemoImages(join(root, "img"), { scale, apps: ["alpha"] });
  const alpha = imgs.families[0]!;
  const s3 = await startS3(["bench"]);
  const proxy = throttlingProxy(s3.endpoint, rate);
  const env = { AWS_ENDPOINT_URL: proxy.url, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "", AWS_SECRET_ACCESS_KEY: "" };
  try {
    await upload(s3, "alpha", alpha.dir);
    for (const f of layersOf(alpha.dir)) await Bun.file(join(alpha.dir, f)).arrayBuffer(); // warm the page cache
    const source = "s3://bench/alpha/";
    const downloadScript = `const { resolveImage } = await import(${JSON.stringify(join(repo, "lib/image/resolve.ts"))}); await resolveImage(${JSON.stringify(source)}, { stateDir: process.argv[1] });`;
    const dl: number[] = [];
    const apply: number[] = [];
    const e2e: number[] = [];
    const runs = [
      async () => dl.push((await timed(["bun", "-e", downloadScript, join(root, `dl-${dl.length}`)], env)).ms),
      async () => apply.push((await timed(unpackCli(await freshPool(), alpha.dir))).ms),
      async () => e2e.push((await timed(unpackCli(await freshPool(), source), env)).ms),
    ];
    for (let r = 0; r < rounds; r++) {
      for (let k = 0; k < runs.length; k++) await runs[(r + k) % runs.length]!();
      console.error(`bench: round ${r + 1}/${rounds}: download ${ms(dl.at(-1)!)}, apply ${ms(apply.at(-1)!)}, end to end ${ms(e2e.at(-1)!)}`);
    }
    const larger = Math.max(median(dl), median(apply));
    const mb = imgs.bytes[0]! / 1e6;
    console.log(`\nthinimg streamed S3 pipeline benchmark (inside the test VM; S3 throttled to ${flags.rate} MB/s; ${mb.toFixed(0)} MB in 5 layers)`);
    console.log(`  rounds: download ${dl.map(ms).join(", ")}; apply ${apply.map(ms).join(", ")}; end to end ${e2e.map(ms).join(", ")}`);
    console.log(`  download alone (median of ${rounds})  ${ms(median(dl)).padStart(9)}  (${(mb / (median(dl) / 1000)).toFixed(1)} MB/s)`);
    console.log(`  apply alone (local unpack)          ${ms(median(apply)).padStart(9)}`);
    console.log(
      `  end to end (streamed unpack)        ${ms(median(e2e)).padStart(9)}  vs ${ms(larger)} (the larger)  ${(median(e2e) / larger).toFixed(2)}×  target ≤ 1.10×`,
    );

    if (!flags["skip-rss"]) {
      const big = await writeDemoImages(join(root, "big"), { scale: Number(flags["rss-scale"]), apps: ["gamma"] });
      await upload(s3, "gamma", big.families[0]!.dir);
      rmSync(join(root, "big"), { recursive: true, force: true });
      const r = await timed(unpackCli(await freshPool(), "s3://bench/gamma/"), env);
      console.log(
        `  peak RSS, streamed unpack of a ${(big.bytes[0]! / GiB).toFixed(2)} GiB image: ${(r.peakRssKb / 1024).toFixed(0)} MB in ${ms(r.ms)}  target ≤ 100 MB`,
      );
    }
  } finally {
    proxy.stop();
    await s3.close();
  }
}

try {
  await main();
} finally {
  // the pools' devices end with the VM; their backing files and the images are only scratch
  rmSync(root, { recursive: true, force: true });
}
