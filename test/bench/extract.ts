// bun run bench:extract — extraction speed against GNU tar, on a real multi-layer image.
//
// Image: Debian bookworm minbase (debootstrap from the apt mirror; if that fails, a ~200 MB tree
// copied from /usr), split into 4 layers with umoci (the last one deletes files: whiteouts).
// Cached under /tmp/thinimg-bench-cache; delete that directory to rebuild.
//
// Measured in one run, same blobs, same destination filesystem, 5 rounds (THINIMG_BENCH_RUNS, at
// least 3) after one warm-up each, interleaved round by round, every run into a new directory,
// `sync` before each so no run pays for another's writeback or deletions; the medians are reported:
//   A. from the compressed blobs: thinimg's real product path — extractImage() (what
//      `bun scripts/extract.ts` runs: resolve the OCI layout, verify every blob's sha256 and every
//      layer's diff_id while streaming, gunzip, apply) — vs `tar -xzf` (gzip in a second process);
//   B. from the uncompressed layer tars: extractImage() on them as a layer family (1.tar … 4.tar,
//      every layer's sha256 computed, as the product does) vs `tar -xf`;
//   C. `umoci unpack` of the whole image, as a reference.
// Afterwards thinimg's tree is compared with umoci's entry by entry (test/helpers/tree.ts: type,
// mode, owner, size, content, link, device, xattrs, hardlink groups, mtime) and the number of
// differences is printed (0 expected).
// Wall time is the target; CPU time (user+system of all threads, or of tar and the gzip it waits
// for, via /usr/bin/time) is printed too because it stays meaningful on a shared, busy machine.
// GNU tar runs as root with --same-owner -p --xattrs --xattrs-include='*' --numeric-owner.
import { existsSync, linkSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { cpus, loadavg } from "node:os";
import { join } from "node:path";
import { run, runOk } from "../../lib/exec.ts";
import { extractImage } from "../../lib/image/extract.ts";
import { median } from "../helpers/timed.ts";
import { diffTrees, listTree } from "../helpers/tree.ts";

const CACHE = process.env.THINIMG_BENCH_CACHE ?? "/tmp/thinimg-bench-cache";
const ROOTFS = join(CACHE, "rootfs");
const IMAGE = join(CACHE, "image");
const PLAIN = join(CACHE, "plain");
/** The uncompressed layers as a layer family: 1.tar … N.tar (hardlinks to PLAIN's files). */
const FAMILY = join(CACHE, "family");
/** thinimg's state dir (blob cache): local sources are read in place, so it stays nearly empty. */
const STATE = join(CACHE, "state");
const TAG = "bench";
const RUNS = Math.max(3, Number(process.env.THINIMG_BENCH_RUNS ?? 5));

const MIN = 60_000;

async function sh(argv: string[], timeoutMs = 10 * MIN, cwd?: string): Promise<string> {
  const r = await runOk(argv, { timeoutMs, cwd });
  return r.stdout;
}

/** The machine's own Debian mirror for bookworm (deb822 or one-line sources), else deb.debian.org. */
function mirror(): string {
  const files = listDir("/etc/apt/sources.list.d")
    .filter((n) => n.endsWith(".sources") || n.endsWith(".list")) // not *.disabled, *.save …
    .map((n) => `/etc/apt/sources.list.d/${n}`);
  for (const f of ["/etc/apt/sources.list", ...files]) {
    if (!existsSync(f)) continue;
    for (const stanza of readFileSync(f, "utf8").split(/\n\s*\n/)) {
      const uri = /^URIs:\s*(\S+)/m.exec(stanza)?.[1];
      const suites = /^Suites:\s*(.+)$/m.exec(stanza)?.[1]?.split(/\s+/) ?? [];
      if (uri && suites.includes("bookworm") && !/^Enabled:\s*no/im.test(stanza)) return uri;
    }
    const oneLine = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/m.exec(readFileSync(f, "utf8"));
    if (oneLine?.[1]) return oneLine[1];
  }
  return "http://deb.debian.org/debian";
}

function listDir(d: string): string[] {
  try {
    return readdirSync(d);
  } catch {
    return [];
  }
}

async function ensureRootfs(): Promise<string> {
  const done = join(CACHE, "rootfs.complete");
  if (existsSync(done)) return readFileSync(done, "utf8").trim();
  rmSync(ROOTFS, { recursive: true, force: true });
  mkdirSync(CACHE, { recursive: true });
  const m = mirror();
  console.error(`building rootfs: debootstrap --variant=minbase bookworm from ${m} (a few minutes)…`);
  const r = await run(["debootstrap", "--variant=minbase", "bookworm", ROOTFS, m], { timeoutMs: 20 * MIN });
  let kind: string;
  if (r.exitCode === 0) {
    kind = "debootstrap minbase bookworm";
  } else {
    console.error(`debootstrap failed (${r.stderr.trim().split("\n").pop()}); synthesising a tree from /usr`);
    rmSync(ROOTFS, { recursive: true, force: true });
    mkdirSync(join(ROOTFS, "usr"), { recursive: true });
    for (const d of ["bin", "sbin", "lib", "share/doc", "share/zoneinfo", "share/perl", "share/locale"]) {
      if (existsSync(`/usr/${d}`)) await sh(["cp", "-a", "--parents", `usr/${d}`, ROOTFS], 10 * MIN, "/");
    }
    mkdirSync(join(ROOTFS, "etc"), { recursive: true });
    mkdirSync(join(ROOTFS, "var/lib"), { recursive: true });
    mkdirSync(join(ROOTFS, "opt"), { recursive: true }); // layer 4 copies into it
    await sh(["cp", "-a", "/etc/.", join(ROOTFS, "etc")]);
    kind = "synthesised from host /usr";
  }
  writeFileSync(done, kind);
  return kind;
}

async function ensureImage(): Promise<void> {
  const done = join(CACHE, "image.complete");
  if (existsSync(done)) return;
  rmSync(IMAGE, { recursive: true, force: true });
  const bundle = join(CACHE, "bundle");
  rmSync(bundle, { recursive: true, force: true });
  const ref = `${IMAGE}:${TAG}`;
  await sh(["umoci", "init", "--layout", IMAGE]);
  await sh(["umoci", "new", "--image", ref]);
  await sh(["umoci", "unpack", "--image", ref, bundle]);
  const rootfs = join(bundle, "rootfs");
  const copy = async (args: string[]) => {
    // tar pipe keeps owners, modes, xattrs, hardlinks and times.
    const src = `tar -C ${ROOTFS} --xattrs --xattrs-include='*' -cf - ${args.join(" ")}`;
    const dst = `tar -C ${rootfs} --same-owner -p --xattrs --xattrs-include='*' --numeric-owner -xf -`;
    await sh(["sh", "-c", `${src} | ${dst}`]);
  };
  const repack = (msg: string) => sh(["umoci", "repack", "--refresh-bundle", "--history.comment", msg, "--image", ref, bundle]);
  console.error("layer 1: base system without /usr/share and /var…");
  await copy(["--exclude=./usr/share", "--exclude=./var", "."]);
  await repack("base");
  console.error("layer 2: /usr/share…");
  await copy(["./usr/share"]);
  await repack("share");
  console.error("layer 3: /var…");
  await copy(["./var"]);
  await repack("var");
  console.error("layer 4: deletions and edits…");
  rmSync(join(rootfs, "usr/share/doc"), { recursive: true, force: true });
  rmSync(join(rootfs, "usr/share/man"), { recursive: true, force: true });
  writeFileSync(join(rootfs, "etc/hostname"), "bench\n");
  await sh(["cp", "-a", join(rootfs, "usr/share/zoneinfo"), join(rootfs, "opt/zoneinfo-copy")]);
  await repack("edits");
  rmSync(bundle, { recursive: true, force: true });
  writeFileSync(done, new Date().toISOString());
}

interface Layer {
  blob: string;
  plain: string;
  compressed: number;
  size: number;
}

async function layers(): Promise<Layer[]> {
  const index = JSON.parse(readFileSync(join(IMAGE, "index.json"), "utf8")) as {
    manifests: { digest: string; annotations?: Record<string, string> }[];
  };
  const desc = index.manifests.find((m) => m.annotations?.["org.opencontainers.image.ref.name"] === TAG);
  if (!desc) throw new Error(`no ${TAG} in ${IMAGE}`);
  const blob = (d: string) => join(IMAGE, "blobs", ...d.split(":"));
  const manifest = JSON.parse(readFileSync(blob(desc.digest), "utf8")) as { layers: { digest: string; mediaType: string }[] };
  mkdirSync(PLAIN, { recursive: true });
  const out: Layer[] = [];
  for (const [i, l] of manifest.layers.entries()) {
    if (!l.mediaType.endsWith("gzip")) throw new Error(`layer ${i}: expected gzip, got ${l.mediaType}`);
    const plain = join(PLAIN, `${l.digest.split(":")[1]}.tar`);
    if (!existsSync(plain)) await sh(["sh", "-c", `gzip -dc < ${blob(l.digest)} > ${plain}.tmp && mv ${plain}.tmp ${plain}`]);
    out.push({ blob: blob(l.digest), plain, compressed: statSync(blob(l.digest)).size, size: statSync(plain).size });
  }
  rmSync(FAMILY, { recursive: true, force: true });
  mkdirSync(FAMILY, { recursive: true });
  for (const [i, l] of out.entries()) linkSync(l.plain, join(FAMILY, `${i + 1}.tar`));
  return out;
}

// Every run gets its own new directory and nothing is deleted until the end: on this ext4
// (mounted with `discard`) deleting the previous tree leaves the kernel work that slows the next
// run by up to 3x, whichever tool it is. `sync` before each run writes back the previous one.
let runSeq = 0;
async function fresh(base: string): Promise<string> {
  const dir = `${base}-${runSeq++}`;
  mkdirSync(dir, { recursive: true });
  await sh(["sync"]);
  return dir;
}

/** CPU seconds (user+system, all threads and waited-for children) of one run. */
type Runner = (dest: string) => Promise<number>;

const TAR_FLAGS = ["--same-owner", "-p", "--xattrs", "--xattrs-include=*", "--numeric-owner"];

/** Run under /usr/bin/time: its rusage covers the command and the children it waited for (gzip). */
async function timedCmd(argv: string[]): Promise<number> {
  const r = await runOk(["/usr/bin/time", "-f", "cpu %U %S", ...argv], { timeoutMs: 10 * MIN });
  const m = /cpu ([\d.]+) ([\d.]+)\s*$/.exec(r.stderr);
  if (!m) throw new Error(`no rusage from /usr/bin/time: ${r.stderr.slice(-200)}`);
  return Number(m[1]) + Number(m[2]);
}

/** The product path: extractImage() — resolve, every digest / diff_id check, decompression, apply. */
function thinimg(source: string, select?: string): Runner {
  return async (dest) => {
    const c0 = process.cpuUsage();
    await extractImage(source, dest, { stateDir: STATE, devices: true, ...(select ? { select } : {}) });
    const c = process.cpuUsage(c0);
    return (c.user + c.system) / 1e6;
  };
}

function gnuTar(ls: Layer[], compressed: boolean): Runner {
  return async (dest) => {
    let cpu = 0;
    for (const l of ls) {
      cpu += await timedCmd(["tar", "-x", ...(compressed ? ["-z"] : []), ...TAR_FLAGS, "-f", compressed ? l.blob : l.plain, "-C", dest]);
    }
    return cpu;
  };
}

const umoci: Runner = async (dest) => {
  rmSync(dest, { recursive: true, force: true }); // umoci wants to create the bundle itself
  return timedCmd(["umoci", "unpack", "--image", `${IMAGE}:${TAG}`, dest]);
};

/** Entry-by-entry comparison with xattrs (test/helpers/tree.ts): the differences, [] when identical. */
function treeDiff(want: string, got: string): { entries: number; diffs: string[] } {
  const w = listTree(want);
  return { entries: w.size - 1, diffs: diffTrees(w, listTree(got)) };
}

interface Contender {
  name: string;
  fn: Runner;
  dest: string;
  /** Wall time of each round, ms. */
  walls: number[];
  /** CPU time of each round, s. */
  cpus: number[];
}

const wall = (c: Contender) => median(c.walls);
const cpu = (c: Contender) => median(c.cpus);

/** One warm-up each, then RUNS rounds in which every contender runs once: noise hits all alike. */
async function race(cs: Contender[]): Promise<void> {
  for (const c of cs) await c.fn(await fresh(c.dest));
  for (let i = 0; i < RUNS; i++) {
    for (const c of cs) {
      const dest = await fresh(c.dest);
      const t = performance.now();
      const used = await c.fn(dest);
      const ms = performance.now() - t;
      c.walls.push(ms);
      c.cpus.push(used);
      console.error(`  round ${i + 1}  ${c.name.padEnd(14)} ${(ms / 1000).toFixed(3)} s wall  ${used.toFixed(3)} s cpu`);
    }
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error("run as root (owners, modes and xattrs are part of the work)");
  const kind = await ensureRootfs();
  await ensureImage();
  const ls = await layers();
  const total = ls.reduce((a, l) => a + l.size, 0);
  const gz = ls.reduce((a, l) => a + l.compressed, 0);
  const out = join(CACHE, "out");
  console.log(
    `image: ${kind}, ${ls.length} layers, ${(total / 1e6).toFixed(1)} MB uncompressed, ${(gz / 1e6).toFixed(1)} MB gzip; ` +
      `${cpus().length} CPUs, bun ${Bun.version}`,
  );

  const load0 = loadavg()[0]!;
  rmSync(out, { recursive: true, force: true });
  const c = (name: string, fn: Runner, d: string): Contender => ({ name, fn, dest: `${out}/${d}`, walls: [], cpus: [] });
  const tarGz = c("tar -xzf", gnuTar(ls, true), "tar");
  const thinGz = c("thinimg gzip", thinimg(IMAGE, TAG), "thingz");
  const tar = c("tar -xf", gnuTar(ls, false), "tar");
  const thin = c("thinimg plain", thinimg(FAMILY), "thin");
  const um = c("umoci unpack", umoci, "umoci");
  await race([tarGz, thinGz, tar, thin, um]);
  // the last round's trees: thinimg from the blobs (seq - 4), from the plain tars (seq - 2), umoci (seq - 1)
  const fromBlobs = treeDiff(`${out}/umoci-${runSeq - 1}/rootfs`, `${out}/thingz-${runSeq - 4}`);
  const fromPlain = treeDiff(`${out}/umoci-${runSeq - 1}/rootfs`, `${out}/thin-${runSeq - 2}`);
  await sh(["rm", "-rf", out]);

  const s = (ms: number) => `${(ms / 1000).toFixed(3)} s`;
  const x = (a: number, b: number) => `${(a / b).toFixed(2)}x`;
  const row = (label: string, a: Contender, b: Contender) =>
    console.log(
      `${label}  thinimg ${s(wall(a))} (cpu ${cpu(a).toFixed(2)} s)   ${b.name} ${s(wall(b))} (cpu ${cpu(b).toFixed(2)} s)   ` +
        `wall ratio ${x(wall(a), wall(b))}, cpu ratio ${x(cpu(a), cpu(b))}`,
    );
  row("A. compressed blobs ", thinGz, tarGz);
  row("B. uncompressed tars", thin, tar);
  console.log(`C. umoci unpack        ${s(wall(um))} (cpu ${cpu(um).toFixed(2)} s)   ${x(wall(um), wall(tarGz))} GNU tar -xzf`);
  // The same round's runs share the machine's state of the moment: their ratio is the fairest.
  const perRound = (a: Contender, b: Contender, f: (c: Contender) => number[]) => x(median(f(a).map((v, i) => v / f(b)[i]!)), 1);
  console.log(
    `median of the per-round ratios: from the gzip blobs ${perRound(thinGz, tarGz, (c) => c.walls)} wall, ${perRound(thinGz, tarGz, (c) => c.cpus)} cpu; ` +
      `from the plain layer tars ${perRound(thin, tar, (c) => c.walls)} wall, ${perRound(thin, tar, (c) => c.cpus)} cpu`,
  );
  console.log(
    `ratio (thinimg extractImage / GNU tar, medians of ${RUNS} interleaved rounds): ` +
      `from the gzip blobs ${x(wall(thinGz), wall(tarGz))} wall, ${x(cpu(thinGz), cpu(tarGz))} cpu; ` +
      `from the plain layer tars ${x(wall(thin), wall(tar))} wall, ${x(cpu(thin), cpu(tar))} cpu`,
  );
  for (const [label, d] of [
    ["from the blobs", fromBlobs],
    ["from the plain tars", fromPlain],
  ] as const) {
    console.log(
      `thinimg (${label}) vs umoci unpack, ${d.entries} entries with xattrs: ${d.diffs.length} differences` +
        (d.diffs.length ? ` (e.g. ${d.diffs.slice(0, 3).join("; ")})` : ""),
    );
  }
  console.log(`load average (1 min) at start ${load0.toFixed(2)}, at end ${loadavg()[0]!.toFixed(2)} on ${cpus().length} CPUs`);
}

await main();
