// Fuzz-style robustness of the one tar header decoder: truncated, bit-flipped, field-scrambled and
// random inputs, fed to both of its users — the layer reader (applyLayer into a real directory) and
// the image-archive index (indexTarFile) — must each end either in success or in ONE line: a
// ThinimgError whose message has no newline and, for a malformed archive, names the offset. Never
// another exception (a stack trace), never a hang (each case is bounded by the test timeout).
// A few inputs go through the real `bun scripts/extract.ts` as a subprocess: exit 3, one stderr line.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { ThinimgError } from "../../lib/errors.ts";
import { applyLayer } from "../../lib/image/apply/index.ts";
import { indexTarFile } from "../../lib/image/archive/tar-index.ts";
import { writeLayerFamily } from "../helpers/images.ts";
import { dir, entry, file, gnuLong, gnuSparse, hardlink, pax, paxSparse, streamOf, symlink, tar } from "../helpers/tarcraft.ts";

if (process.getuid?.() !== 0) throw new Error("the fuzz test applies layers as root (owners, xattrs)");

const TMP = mkdtempSync("/tmp/thinimg-fuzz-");
afterAll(() => void Bun.spawnSync(["rm", "-rf", TMP]));

/** Deterministic PRNG (mulberry32): a failure reproduces from its case number. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Every feature of the decoder in one valid layer. */
const SEED = tar(
  dir("etc"),
  file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", { mode: 0o644 }),
  pax({ "SCHILY.xattr.user.k": Buffer.from([0, 0xff, 1]), mtime: "1700000000.5", path: "etc/long-pax-name" }),
  file("placeholder", "pax"),
  gnuLong("L", `usr/${"n".repeat(150)}`),
  file("short", "gnu long"),
  entry({ name: Buffer.from("bin/\xff\xfe", "latin1"), data: "bytes" }),
  symlink("bin/sh", "busybox"),
  hardlink("etc/passwd2", "etc/passwd"),
  entry({ name: "big-ids", data: "b", uid: 70000, base256: true }),
  gnuSparse(
    "var/sparse-old",
    1 << 20,
    Array.from({ length: 30 }, (_, i) => [i * 32768, `r${i}`] as [number, string]),
  ),
  paxSparse("1.0", "var/sparse-10", 1 << 20, [
    [4096, "a"],
    [1 << 19, "b"],
  ]),
  paxSparse("0.1", "var/sparse-01", 65536, [[0, "c"]]),
  paxSparse("0.0", "var/sparse-00", 65536, [[100, "d"]]),
);

/** The header blocks of SEED (offsets), so mutations can aim at fields that matter. */
function headerOffsets(t: Buffer): number[] {
  const out: number[] = [];
  for (let o = 0; o + 512 <= t.length; o += 512) {
    if (t.toString("latin1", o + 257, o + 262) === "ustar") out.push(o);
  }
  return out;
}

function fixChecksum(b: Buffer, o: number): void {
  b.fill(0x20, o + 148, o + 156);
  let sum = 0;
  for (let i = o; i < o + 512; i++) sum += b[i]!;
  b.write(`${sum.toString(8).padStart(6, "0")}\0 `, o + 148, "latin1");
}

type Mutant = { what: string; data: Buffer };

function mutants(): Mutant[] {
  const out: Mutant[] = [];
  const r = rng(9);
  const heads = headerOffsets(SEED);
  // truncations: at every block boundary and at random points
  for (let o = 512; o < SEED.length; o += 512) out.push({ what: `truncated at ${o}`, data: SEED.subarray(0, o) });
  for (let i = 0; i < 40; i++) {
    const o = Math.floor(r() * SEED.length);
    out.push({ what: `truncated at ${o}`, data: SEED.subarray(0, o) });
  }
  // bit flips anywhere (the checksum catches most in headers; data and PAX bodies are not checksummed)
  for (let i = 0; i < 150; i++) {
    const b = Buffer.from(SEED);
    const n = 1 + Math.floor(r() * 4);
    for (let k = 0; k < n; k++) b[Math.floor(r() * b.length)]! ^= 1 << Math.floor(r() * 8);
    out.push({ what: `bit flips #${i}`, data: b });
  }
  // scrambled header fields with a valid checksum: the decoder's field rules are what answers
  const fields: [number, number][] = [
    [0, 100],
    [100, 8],
    [108, 8],
    [116, 8],
    [124, 12],
    [136, 12],
    [156, 1],
    [157, 100],
    [329, 8],
    [337, 8],
    [345, 155],
    [386, 96],
    [482, 1],
    [483, 12],
  ];
  for (let i = 0; i < 300; i++) {
    const b = Buffer.from(SEED);
    const h = heads[Math.floor(r() * heads.length)]!;
    const [off, len] = fields[Math.floor(r() * fields.length)]!;
    const mode = r();
    for (let k = 0; k < len; k++) {
      if (mode < 0.3) b[h + off + k] = Math.floor(r() * 256);
      else if (mode < 0.6) b[h + off + k] = "01234567 \0"[Math.floor(r() * 10)]!.charCodeAt(0);
      else if (r() < 0.3) b[h + off + k] = Math.floor(r() * 256);
    }
    if (r() < 0.2) b[h + off] = 0x80 | Math.floor(r() * 128); // base-256 marker
    fixChecksum(b, h);
    out.push({ what: `scrambled field ${off}+${len} of the header at ${h} #${i}`, data: b });
  }
  // random bytes of many sizes, with and without a valid first header in front
  for (let i = 0; i < 40; i++) {
    const n = Math.floor(r() * 30_000);
    const g = Buffer.alloc(n);
    for (let k = 0; k < n; k++) g[k] = Math.floor(r() * 256);
    out.push({ what: `random ${n} bytes`, data: g });
    out.push({ what: `a file, then random ${n} bytes`, data: Buffer.concat([file("a", "x"), g]) });
  }
  return out;
}

/** One line, from a ThinimgError; a malformed archive's message names the offset. */
function expectOneLine(e: unknown, what: string): void {
  if (!(e instanceof ThinimgError)) throw new Error(`${what}: not a one-line error: ${e instanceof Error ? e.stack : String(e)}`);
  expect(e.oneLine().includes("\n")).toBe(false);
  expect(["input", "policy"]).toContain(e.kind);
  const offset = (e.details as { offset?: unknown } | undefined)?.offset;
  if (typeof offset === "number") expect(e.message).toMatch(/offset \d+/);
}

describe("fuzz: every malformed input ends in one line", () => {
  const all = mutants();

  test("the seed itself is valid for both readers (mutations start from a good archive)", async () => {
    const d = `${TMP}/seed`;
    mkdirSync(d);
    const st = await applyLayer(streamOf(SEED, 1000), d, { layerLabel: "seed" });
    expect(st.entries).toBe(12);
    writeFileSync(`${TMP}/seed.tar`, SEED);
    expect(indexTarFile(`${TMP}/seed.tar`, { what: "seed" }).members.has("etc/passwd")).toBe(true);
  });

  test("the archive index finds members past sparse entries, and a sparse file is no blob", () => {
    writeFileSync(`${TMP}/seed.tar`, SEED);
    const idx = indexTarFile(`${TMP}/seed.tar`, { what: "seed" });
    for (const n of ["var/sparse-old", "var/sparse-10", "var/sparse-01", "var/sparse-00"]) expect(idx.members.get(n)?.type).toBe("other");
    expect(idx.members.get("etc/long-pax-name")).toMatchObject({ type: "file", size: 3 });
    expect(idx.members.get(`usr/${"n".repeat(150)}`)).toMatchObject({ type: "file", size: 8 });
    expect(idx.members.get("bin/sh")).toMatchObject({ type: "symlink", linkname: "busybox" });
    expect(idx.members.get("etc/passwd2")).toMatchObject({ type: "link", linkname: "etc/passwd" });
    // the member after all four sparse entries, read from its offset
    const after = tar(SEED.subarray(0, SEED.length - 1024), file("last", "found"));
    writeFileSync(`${TMP}/after.tar`, after);
    const m = indexTarFile(`${TMP}/after.tar`, { what: "after" }).members.get("last")!;
    expect(after.toString("latin1", m.offset, m.offset + m.size)).toBe("found");
  });

  test(`${all.length} mutants through applyLayer: success or one line`, async () => {
    let failed = 0;
    for (const [i, m] of all.entries()) {
      const d = `${TMP}/a${i}`;
      mkdirSync(d);
      try {
        await applyLayer(streamOf(m.data, 777), d, { layerLabel: "1", limits: { maxFileBytes: 1 << 24 } });
      } catch (e) {
        expectOneLine(e, m.what);
        failed++;
      }
      rmSync(d, { recursive: true, force: true });
    }
    // the corpus mostly breaks the archive: a reader that accepted everything would be wrong
    expect(failed).toBeGreaterThan(all.length / 2);
  }, 120_000);

  test(`${all.length} mutants through the image-archive index: success or one line`, () => {
    let failed = 0;
    const p = `${TMP}/m.tar`;
    for (const m of all) {
      writeFileSync(p, m.data);
      try {
        indexTarFile(p, { what: "m.tar" });
      } catch (e) {
        expectOneLine(e, m.what);
        expect((e as ThinimgError).message).toMatch(/^m\.tar: not a valid tar archive \(.*offset \d+.*\)$/);
        failed++;
      }
    }
    expect(failed).toBeGreaterThan(all.length / 3);
  }, 60_000);
});

describe("scripts/extract.ts answers malformed input with one line (exit 3)", () => {
  const repo = `${import.meta.dir}/../..`;
  async function cli(source: string): Promise<{ code: number; err: string; out: string }> {
    const dest = `${TMP}/cli-dest-${Math.random().toString(36).slice(2)}`;
    const p = Bun.spawn(["bun", "scripts/extract.ts", source, dest, "--state-dir", `${TMP}/cli-state`], {
      cwd: repo,
      stdout: "pipe",
      stderr: "pipe",
      timeout: 30_000,
    });
    const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
    return { code, err, out };
  }
  const r = rng(3);
  const random = Buffer.alloc(20_000);
  for (let k = 0; k < random.length; k++) random[k] = Math.floor(r() * 256);
  const second = headerOffsets(SEED)[1]!;
  const flipped = Buffer.from(SEED);
  flipped[second + 130] = flipped[second + 130]! ^ 0x04; // a digit of the second header's size
  const cases: [string, () => string, RegExp][] = [
    ["20,000 random bytes as an image", () => write("random.bin", random), /not a valid tar archive \(bad header checksum at offset 0\)/],
    ["a truncated single-layer tarball", () => write("trunc.tar", SEED.subarray(0, 1024 + 300)), /offset \d+/],
    [
      "a layer family whose layer has a flipped header bit",
      () => family("flip", flipped),
      new RegExp(`layer 1/1 \\(1\\.tar\\): corrupt tar header at offset ${second} \\(checksum mismatch\\)`),
    ],
    ["a layer family whose layer is truncated in a sparse map", () => family("trunc", SEED.subarray(0, SEED.indexOf("GNUSparseFile") + 600)), /offset \d+/],
  ];
  function write(name: string, data: Buffer): string {
    writeFileSync(`${TMP}/${name}`, data);
    return `${TMP}/${name}`;
  }
  function family(name: string, layer: Buffer): string {
    writeLayerFamily(`${TMP}/${name}`, [layer]);
    return `${TMP}/${name}`;
  }
  test("--json: a name that is not UTF-8 is shown escaped in the error envelope, never mangled", async () => {
    const layer = tar(entry({ name: Buffer.from("../caf\xe9/\xff", "latin1"), data: "x" }));
    const dest = `${TMP}/cli-json-dest`;
    const p = Bun.spawn(["bun", "scripts/extract.ts", family("json", layer), dest, "--json", "--state-dir", `${TMP}/cli-state`], {
      cwd: repo,
      stdout: "pipe",
      stderr: "pipe",
      timeout: 30_000,
    });
    const [out, code] = await Promise.all([new Response(p.stdout).text(), p.exited]);
    expect(code).toBe(4);
    const lines = out.trimEnd().split("\n");
    expect(lines.length).toBe(1);
    const env = JSON.parse(lines[0]!);
    expect(env.ok).toBe(false);
    expect(env.error.message).toBe('layer 1/1 (1.tar): entry ../caf\\xe9/\\xff: path climbs out of the root ("..")');
    expect(out.includes("\ufffd")).toBe(false);
  }, 40_000);

  for (const [label, make, match] of cases) {
    test(label, async () => {
      const { code, err, out } = await cli(make());
      expect(out).toBe("");
      expect(code).toBe(3);
      const lines = err.trimEnd().split("\n");
      expect(lines.length).toBe(1);
      expect(lines[0]!).toMatch(/^error: /);
      expect(lines[0]!).toMatch(match);
    }, 40_000);
  }
});
