// Streamed S3 → unpacked image. `bun run bench:pipeline` (= bun test/bench/pipeline.ts [--scale 16]
// [--rate 50] [--rounds 3] [--rss-scale 170] [--skip-rss]) runs on the HOST: it writes the images,
// starts a real S3 (npm s3rver) behind a throttling proxy (one token bucket for all connections: the
// link, at --rate MB/s) on the host end of a tap link (lib/vm/net.ts; root and /dev/net/tun), then
// boots the test VM, which reaches S3 over that link. S3 thus runs on the host's CPUs, not on the
// guest's only CPU: in production S3 is another machine, and an S3 server inside the one-CPU guest
// takes the CPU the unpack needs (it made the download CPU-bound at ~5 MB/s). In the VM, in each
// round, on fresh pools and state dirs, in rotating order:
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
import { createVmNet } from "../../lib/vm/net.ts";
import { runInVm } from "../../lib/vm/uml.ts";
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
    // set by the host half for the half in the VM
    inner: { type: "string" },
  },
});

const GiB = 1024 ** 3;
const repo = join(import.meta.dir, "../..");
const ms = (n: number) => `${n.toFixed(0)} ms`;

/** A proxy in front of S3 that passes at most `rate` bytes/s of response bodies, over all connections. */
function throttlingProxy(hostname: string, upstream: string, rate: number): { url: string; stop(): void } {
  let next = performance.now(); // when the link is free again
  const SLICE = 64 * 1024;
  const server = Bun.serve({
    hostname,
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
  return { url: `http://${hostname}:${server.port}`, stop: () => server.stop(true) };
}

function layersOf(dir: string): string[] {
  return readdirSync(dir)
    .filter((f) => /^\d+\.tar$/.test(f))
    .sort((a, b) => Number.parseInt(a, 10) - Number.parseInt(b, 10));
}

async function upload(s3: TestS3, prefix: string, dir: string): Promise<void> {
  for (const f of layersOf(dir)) await s3.put("bench", `${prefix}/${f}`, Bun.file(join(dir, f)) as unknown as Uint8Array);
}

/** What the host half hands the half in the VM. */
interface Inner {
  endpoint: string;
  guestSetup: string[][];
  alphaDir: string;
  alphaBytes: number;
  /** the ~1 GiB image's size, when its RSS run is on */
  gammaBytes: number | null;
}

/** Host half: images, S3 and the link; then the VM runs this file again with --inner. */
async function host(): Promise<number> {
  const root = mkdtempSync("/tmp/thinimg-bench-pipeline-");
  const net = await createVmNet();
  const s3 = await startS3(["bench"]);
  const proxy = throttlingProxy(net.hostAddr, s3.endpoint, Number(flags.rate) * 1e6);
  try {
    console.error(`bench: generating the images (scale ${flags.scale}) under ${root}; S3 on the host at ${proxy.url} (tap ${net.tap})`);
    const imgs = await writeDemoImages(join(root, "img"), { scale: Number(flags.scale), apps: ["alpha"] });
    await upload(s3, "alpha", imgs.families[0]!.dir);
    let gammaBytes: number | null = null;
    if (!flags["skip-rss"]) {
      const big = await writeDemoImages(join(root, "big"), { scale: Number(flags["rss-scale"]), apps: ["gamma"] });
      await upload(s3, "gamma", big.families[0]!.dir);
      rmSync(join(root, "big"), { recursive: true, force: true });
      gammaBytes = big.bytes[0]!;
    }
    const inner: Inner = { endpoint: proxy.url, guestSetup: net.guestSetup, alphaDir: imgs.families[0]!.dir, alphaBytes: imgs.bytes[0]!, gammaBytes };
    const argv = ["bun", join(repo, "test/bench/pipeline.ts"), "--rounds", flags.rounds!, "--rate", flags.rate!, "--inner", JSON.stringify(inner)];
    const r = await runInVm({
      argv,
      mem: "2G",
      timeoutMs: 1_800_000,
      kernelArgs: net.kernelArgs,
      stdout: (c) => process.stdout.write(c),
      stderr: (c) => process.stderr.write(c),
    });
    if (r.timedOut) console.error("bench: the VM timed out");
    return r.exitCode ?? 1;
  } finally {
    proxy.stop();
    await s3.close();
    await net.close();
    rmSync(root, { recursive: true, force: true });
  }
}

let poolN = 0;
async function freshPool(root: string): Promise<{ pool: string; stateDir: string }> {
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

/** VM half: the rounds, against the host's S3. */
async function guest(inner: Inner, root: string): Promise<void> {
  await runOk(["ip", "link", "set", "lo", "up"]);
  for (const argv of inner.guestSetup) await runOk(argv);
  const rounds = Number(flags.rounds);
  const env = { AWS_ENDPOINT_URL: inner.endpoint, AWS_REGION: "us-east-1", AWS_ACCESS_KEY_ID: "", AWS_SECRET_ACCESS_KEY: "" };
  for (const f of layersOf(inner.alphaDir)) await Bun.file(join(inner.alphaDir, f)).arrayBuffer(); // warm the page cache
  const source = "s3://bench/alpha/";
  const downloadScript = `const { resolveImage } = await import(${JSON.stringify(join(repo, "lib/image/resolve.ts"))}); await resolveImage(${JSON.stringify(source)}, { stateDir: process.argv[1] });`;
  const dl: number[] = [];
  const apply: number[] = [];
  const e2e: number[] = [];
  const cpu = { dl: [] as number[], apply: [] as number[], e2e: [] as number[] };
  const record = (wall: number[], cpuOf: number[], r: { ms: number; cpuMs: number }) => {
    wall.push(r.ms);
    cpuOf.push(r.cpuMs);
  };
  const runs = [
    async () => record(dl, cpu.dl, await timed(["bun", "-e", downloadScript, join(root, `dl-${dl.length}`)], env)),
    async () => record(apply, cpu.apply, await timed(unpackCli(await freshPool(root), inner.alphaDir))),
    async () => record(e2e, cpu.e2e, await timed(unpackCli(await freshPool(root), source), env)),
  ];
  for (let r = 0; r < rounds; r++) {
    for (let k = 0; k < runs.length; k++) await runs[(r + k) % runs.length]!();
    console.error(`bench: round ${r + 1}/${rounds}: download ${ms(dl.at(-1)!)}, apply ${ms(apply.at(-1)!)}, end to end ${ms(e2e.at(-1)!)}`);
  }
  const larger = Math.max(median(dl), median(apply));
  const mb = inner.alphaBytes / 1e6;
  console.log(
    `\nthinimg streamed S3 pipeline benchmark (in the test VM; S3 on the host over a tap link, throttled to ${flags.rate} MB/s; ${mb.toFixed(0)} MB in 5 layers)`,
  );
  console.log(`  rounds: download ${dl.map(ms).join(", ")}; apply ${apply.map(ms).join(", ")}; end to end ${e2e.map(ms).join(", ")}`);
  console.log(`  download alone (median of ${rounds})  ${ms(median(dl)).padStart(9)}  (${(mb / (median(dl) / 1000)).toFixed(1)} MB/s)`);
  console.log(`  apply alone (local unpack)          ${ms(median(apply)).padStart(9)}`);
  // one guest CPU: if download + apply need more CPU than the larger takes in wall time, no overlap can hide it
  console.log(`  guest CPU (medians): download ${ms(median(cpu.dl))}, apply ${ms(median(cpu.apply))}, end to end ${ms(median(cpu.e2e))}`);
  const ratio = median(e2e) / larger;
  console.log(
    `  end to end (streamed unpack)        ${ms(median(e2e)).padStart(9)}  vs ${ms(larger)} (the larger)  ${ratio.toFixed(2)}×  target ≤ 1.10×: ${ratio <= 1.1 ? "met" : "missed"}`,
  );
  if (inner.gammaBytes !== null) {
    const r = await timed(unpackCli(await freshPool(root), "s3://bench/gamma/"), env);
    const mbRss = r.peakRssKb / 1024;
    console.log(
      `  peak RSS, streamed unpack of a ${(inner.gammaBytes / GiB).toFixed(2)} GiB image: ${mbRss.toFixed(0)} MB in ${ms(r.ms)}  target ≤ 100 MB: ${mbRss <= 100 ? "met" : "missed"}`,
    );
  }
}

if (flags.inner === undefined) process.exit(await host());
else {
  if (!dmAvailable().ok) throw new Error("--inner is the half that runs in the VM: run `bun run bench:pipeline` on the host");
  const root = mkdtempSync("/tmp/thinimg-bench-pipeline-vm-");
  try {
    await guest(JSON.parse(flags.inner) as Inner, root);
  } finally {
    // the pools' devices end with the VM; their backing files are only scratch
    rmSync(root, { recursive: true, force: true });
  }
}
