// `bun scripts/extract.ts` end to end, as a user runs it: real processes, real files, a real S3
// server; exit codes and one-line errors (never a stack trace) for bad input.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { extractCommand } from "../../lib/cli/commands/extract.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { extractImage } from "../../lib/image/extract.ts";
import { buildLayerTar, compress, OciLayout, sampleLayer, withRef, writeDockerArchive, writeLayerFamily } from "../helpers/images.ts";
import { run } from "../helpers/run.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";

const repo = join(import.meta.dir, "../..");
const root = mkdtempSync("/tmp/thinimg-extract-test-");
chmodSync(root, 0o777); // the unprivileged runs (asNobody) write their DEST here too
const stateDir = join(root, "state");
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const tmp = (name: string) => join(root, `${++n}-${name}`);

async function extract(args: string[], env: Record<string, string> = {}) {
  const r = await run(["bun", "scripts/extract.ts", ...args, "--state-dir", stateDir], {
    cwd: repo,
    env: { ...process.env, THINIMG_LOG_LEVEL: "info", ...env },
  });
  return { code: r.code, stdout: r.out, stderr: r.err };
}

/** The CLI as an unprivileged user (nobody), for permission cases; its state dir is its own. */
async function asNobody(args: string[]) {
  const state = join(root, "state-nobody");
  mkdirSync(state, { recursive: true });
  chmodSync(state, 0o777);
  const r = await run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bun", "scripts/extract.ts", ...args, "--state-dir", state], {
    cwd: repo,
    env: { ...process.env, HOME: "/tmp", THINIMG_LOG_LEVEL: "info" },
  });
  return { code: r.code, stdout: r.out, stderr: r.err };
}

/** A failure is exactly one "error: …" line on stderr, no stack. */
function oneLine(r: { stderr: string }): string {
  const lines = r.stderr.trim().split("\n");
  expect(lines.length).toBe(1);
  expect(lines[0]!).toStartWith("error: ");
  expect(r.stderr).not.toMatch(/\n\s+at /);
  return lines[0]!;
}

// Layer 1: a base tree. Layer 2: deletes via whiteout, adds a symlink, overrides a file.
const base = buildLayerTar([
  { path: "etc/", type: "dir" },
  { path: "etc/os-release", content: "ID=test\n" },
  { path: "etc/old.conf", content: "old\n" },
  { path: "bin/", type: "dir" },
  { path: "bin/tool", content: "#!/bin/sh\necho 1\n", mode: 0o755 },
]);
const top = buildLayerTar([
  { path: "etc/.wh.old.conf" },
  { path: "bin/tool", content: "#!/bin/sh\necho 2\n", mode: 0o755 },
  { path: "usr/", type: "dir" },
  { path: "usr/bin", type: "symlink", linkpath: "/bin" },
]);

function checkTree(dest: string) {
  expect(readFileSync(join(dest, "etc/os-release"), "utf8")).toBe("ID=test\n");
  expect(existsSync(join(dest, "etc/old.conf"))).toBe(false);
  expect(existsSync(join(dest, "etc/.wh.old.conf"))).toBe(false);
  expect(readFileSync(join(dest, "bin/tool"), "utf8")).toBe("#!/bin/sh\necho 2\n");
  expect(lstatSync(join(dest, "bin/tool")).mode & 0o7777).toBe(0o755);
  expect(readlinkSync(join(dest, "usr/bin"))).toBe("/bin");
}

describe("extract: success", () => {
  test("docker-archive:TAG → tree, human summary on stdout", async () => {
    const src = tmp("img.tar");
    writeDockerArchive(src, [
      { tags: ["app:1"], layers: [base, compress(top, "gzip")] },
      { tags: ["other:1"], layers: [base] },
    ]);
    const dest = tmp("out");
    const r = await extract([`${src}:app:1`, dest]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^extracted .*img\.tar \(docker-archive, app:1, linux\/amd64\) into .*out: 2 layers, 9 entries, .* in [\d.]+ s\n$/);
    checkTree(dest);
  });

  test("--json: stable keys on stdout; an empty existing DEST is fine", async () => {
    const layout = new OciLayout();
    const img = layout.addImage({ layers: [compress(base, "zstd"), top], config: { cmd: ["/bin/tool"] } });
    const src = layout.writeTar(tmp("oci.tar"), [withRef(img.manifest, "v1")]);
    const dest = tmp("empty");
    mkdirSync(dest);
    const r = await extract([src, dest, "--json"]);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j).toMatchObject({ ok: true, format: "oci-layout", name: "v1", entries: 9, whiteouts: 1, config: { cmd: ["/bin/tool"] } });
    expect(j.layers.map((l: { compression: string }) => l.compression)).toEqual(["zstd", "none"]);
    expect(typeof j.seconds).toBe("number");
    checkTree(dest);
  });

  test("layer family directory", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [base, compress(top, "gzip")]);
    const dest = tmp("out");
    const r = await extract([src, dest]);
    expect(r.code).toBe(0);
    checkTree(dest);
  });
});

describe("extract: S3", () => {
  let s3: TestS3;
  beforeAll(async () => {
    s3 = await startS3(["images"]);
    await s3.put("images", "fam/1.tar", compress(base, "zstd"));
    await s3.put("images", "fam/2.tar", top);
  });
  afterAll(async () => {
    await s3?.close();
  });

  test("anonymous prefix family, then a re-run from the cache", async () => {
    const dest = tmp("out");
    const r = await extract(["s3://images/fam/", dest], s3.env(false));
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    checkTree(dest);
    const gets = s3.gets("images", "fam/1.tar") + s3.gets("images", "fam/2.tar");
    expect(gets).toBe(2);
    const again = await extract(["s3://images/fam/", tmp("out2"), "--json"], s3.env(true));
    expect(again.code).toBe(0);
    expect(s3.gets("images", "fam/1.tar") + s3.gets("images", "fam/2.tar")).toBe(2);
  });
});

describe("extract: refusals are one line with an exit code", () => {
  test("DEST not empty → conflict (8), nothing touched", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [base]);
    const dest = tmp("busy");
    mkdirSync(dest);
    writeFileSync(join(dest, "keep"), "mine");
    const r = await extract([src, dest]);
    expect(r.code).toBe(8);
    expect(oneLine(r)).toBe(`error: ${dest} is not empty — choose a new DEST or empty it first`);
    expect(readFileSync(join(dest, "keep"), "utf8")).toBe("mine");
  });

  test("missing source (3), unknown flag (2), missing DEST (2)", async () => {
    const r1 = await extract([join(root, "nope.tar"), tmp("out")]);
    expect(r1.code).toBe(3);
    expect(oneLine(r1)).toContain("nope.tar: no such file or directory");
    const r2 = await extract([join(root, "nope.tar"), tmp("out"), "--max-size", "1G"]);
    expect(r2.code).toBe(2);
    expect(oneLine(r2)).toContain("unknown option --max-size");
    const r3 = await extract([join(root, "nope.tar")]);
    expect(r3.code).toBe(2);
    oneLine(r3);
    const r4 = await extract([join(root, "nope.tar"), tmp("out"), "--max-bytes", "lots"]);
    expect(r4.code).toBe(2);
    expect(oneLine(r4)).toContain('--max-bytes: "lots" is not a size');
  });

  test("a hostile entry names layer, entry and rule; the partial DEST is removed", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [
      base,
      buildLayerTar([
        { path: "ok", content: "x" },
        { path: "../../escape", content: "pwned" },
      ]),
    ]);
    const dest = tmp("out");
    const r = await extract([src, dest]);
    expect(r.code).not.toBe(0);
    const line = oneLine(r);
    expect(line).toMatch(/^error: layer 2\/2 \(2\.tar\): entry \S*escape\S*: /);
    expect(existsSync(dest)).toBe(false);
    expect(existsSync(join(root, "escape"))).toBe(false);
  });

  for (const [how, tamper] of [
    ["file content", (b: Buffer) => Buffer.from(b.toString("latin1").replace("ID=test", "ID=evil"), "latin1")],
    ["a tar header", (b: Buffer) => Buffer.from(b).fill(0x20, 600, 610)],
  ] as const) {
    test(`a tampered OCI blob (${how}): digest mismatch, exit 3, DEST emptied`, async () => {
      const layout = new OciLayout();
      const img = layout.addImage({ layers: [base] });
      const dir = layout.writeDir(tmp("oci"), [img.manifest]);
      writeFileSync(join(dir, "blobs/sha256", img.layers[0]!.digest.slice(7)), tamper(base));
      const dest = tmp("empty");
      mkdirSync(dest);
      const r = await extract([dir, dest]);
      expect(r.code).toBe(3);
      expect(oneLine(r)).toContain(`layer 1/1 (${img.layers[0]!.digest.slice(0, 19)}): digest mismatch`);
      expect(existsSync(dest)).toBe(true); // a DEST the user made is emptied, not removed
      expect(readdirSync(dest)).toEqual([]);
    });
  }

  test("a gzip bomb stops at --max-bytes (policy, exit 4)", async () => {
    const bomb = compress(buildLayerTar([{ path: "zeros", content: new Uint8Array(16 * 1024 * 1024) }]), "gzip");
    const src = tmp("fam");
    writeLayerFamily(src, [bomb]);
    const r = await extract([src, tmp("out"), "--max-bytes", "4M"]);
    expect(r.code).toBe(4);
    // applyLayer's own byte budget (which names the entry) or the decompression cap, whichever trips first
    expect(oneLine(r)).toMatch(/^error: layer 1\/1 \(1\.tar\): (entry zeros: layer would exceed 4194304 bytes|decompressed size exceeds)/);
  });

  test("an image over the total entry budget is refused in the layer that crosses it", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [sampleLayer(1), sampleLayer(2)]);
    const r = await extract([src, tmp("out"), "--max-entries", "5"]);
    expect(r.code).toBe(4);
    expect(oneLine(r)).toBe(
      "error: layer 2/2 (2.tar): image total exceeds the limit of 5 entries (maxEntries; 2 left after earlier layers) — raise --max-entries / THINIMG_MAX_ENTRIES if the image is legitimate",
    );
  });
});

describe("extract: the image-wide budget", () => {
  // three layers of ~30 KB each: a 20 KB file per layer plus headers and padding
  const layers = [1, 2, 3].map((i) => buildLayerTar([{ path: `f${i}`, content: new Uint8Array(20_000).fill(i) }]));
  const stages: string[] = [];
  const peak = new Map<string, number>();
  const progress = {
    stage: (l: string) => void stages.push(l),
    bytes: (done: number) => peak.set(stages.at(-1)!, Math.max(peak.get(stages.at(-1)!) ?? 0, done)),
    done: () => {},
  };

  test("a layer gets only what earlier layers left: nothing past the total is read or written", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [layers[0]!, compress(layers[1]!, "gzip"), layers[2]!]);
    const limit = 40 * 1024;
    const err = await extractImage(src, tmp("out"), { stateDir, limits: { maxTotalBytes: limit }, progress }).catch((e) => e);
    expect(err).toBeInstanceOf(ThinimgError);
    expect((err as ThinimgError).kind).toBe("policy");
    const used = layers[0]!.length; // layer 1 applied whole
    expect((err as ThinimgError).message).toBe(
      `layer 2/3 (2.tar): image total exceeds the limit of ${limit} bytes (maxTotalBytes; ${limit - used} left after earlier layers)`,
    );
    // layer 2 is refused at its file's header: it never read (nor wrote) past what was left
    expect(peak.get("layer 2/3 (2.tar)") ?? 0).toBeLessThanOrEqual(limit - used);
    expect(stages).not.toContain("layer 3/3 (3.tar)");
  });

  test("the decompression cap of a later layer is what is left too", async () => {
    // one compressible 100 KB file per layer: layer 2 trips the gzip cap or applyLayer's own budget
    const big = [1, 2].map((i) => compress(buildLayerTar([{ path: `z${i}`, content: new Uint8Array(100_000) }]), "gzip"));
    const src = tmp("fam");
    writeLayerFamily(src, big);
    const r = await extract([src, tmp("out"), "--max-bytes", "150K"]);
    expect(r.code).toBe(4);
    expect(oneLine(r)).toMatch(
      /^error: layer 2\/2 \(2\.tar\): image total exceeds the limit of 153600 bytes \(maxTotalBytes; \d+ left after earlier layers\) — raise --max-bytes/,
    );
  });

  test("under the budget, all layers apply and the totals add up", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, layers);
    const total = layers.reduce((a, l) => a + l.length, 0);
    const r = await extract([src, tmp("out"), "--json", "--max-bytes", String(total)]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).bytes).toBe(total);
  });
});

describe("extract: limits and their flags", () => {
  const flagNames = new Set(
    Object.entries(extractCommand.args as Record<string, { alias?: string | string[] }>).flatMap(([k, v]) => [
      k,
      ...(v.alias === undefined ? [] : Array.isArray(v.alias) ? v.alias : [v.alias]),
    ]),
  );
  /** Every --flag a hint names must be a flag of this command. */
  function hintFlags(line: string): string[] {
    const hint = line.split(" — ")[1] ?? "";
    const named = [...hint.matchAll(/--([a-z][a-z-]*)/g)].map((m) => m[1]!);
    for (const f of named) expect(flagNames.has(f) ? f : `--${f} (not a flag of extract)`).toBe(f);
    return named;
  }

  const cases: [string, Uint8Array, string[], RegExp, string][] = [
    ["entries", sampleLayer(1), ["--max-entries", "2"], /more than 2 entries \(maxEntries\)/, "max-entries"],
    ["file size", buildLayerTar([{ path: "big", content: new Uint8Array(5000) }]), ["--max-file-size", "4K"], /\(maxFileBytes\)/, "max-file-size"],
    [
      "layer bytes",
      buildLayerTar([{ path: "big", content: new Uint8Array(5000) }]),
      ["--max-bytes", "4K"],
      /\(maxTotalBytes\)|decompressed size exceeds/,
      "max-bytes",
    ],
    ["depth", buildLayerTar([{ path: "a/b/c/d/e", content: "x" }]), ["--max-depth", "4"], /deeper than 4 levels \(maxDepth\)/, "max-depth"],
    [
      "path bytes",
      buildLayerTar([{ path: `${"n".repeat(60)}`, content: "x" }]),
      ["--max-path-bytes", "50"],
      /longer than 50 bytes \(maxPathBytes\)/,
      "max-path-bytes",
    ],
    ["blob size", sampleLayer(1), ["--max-blob-size", "1K"], /larger than the 1024-byte limit/, "max-blob-size"],
  ];
  for (const [what, layer, flags, rule, flag] of cases) {
    test(`${what}: ${flags.join(" ")} stops it, and the hint names a real flag (--${flag})`, async () => {
      const src = tmp("fam");
      writeLayerFamily(src, [layer]);
      const r = await extract([src, tmp("out"), ...flags]);
      expect(r.code).toBe(4);
      const line = oneLine(r);
      expect(line).toMatch(rule);
      expect(hintFlags(line)).toContain(flag);
    });
  }

  test("the same limits come from THINIMG_MAX_DEPTH / THINIMG_MAX_PATH_BYTES; the defaults pass", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [buildLayerTar([{ path: `a/b/c/d/${"n".repeat(60)}`, content: "x" }])]);
    const depth = await extract([src, tmp("out")], { THINIMG_MAX_DEPTH: "3" });
    expect(depth.code).toBe(4);
    expect(oneLine(depth)).toContain("(maxDepth)");
    const bytes = await extract([src, tmp("out")], { THINIMG_MAX_PATH_BYTES: "40" });
    expect(bytes.code).toBe(4);
    expect(oneLine(bytes)).toContain("(maxPathBytes)");
    const bad = await extract([src, tmp("out")], { THINIMG_MAX_DEPTH: "deep" });
    expect(bad.code).toBe(2);
    expect(oneLine(bad)).toContain('THINIMG_MAX_DEPTH: "deep" is not a whole number');
    const ok = await extract([src, tmp("out")]);
    expect(ok.code).toBe(0);
  });
});

describe("extract: devices and FIFOs", () => {
  const nodes = buildLayerTar([
    { path: "dev/", type: "dir" },
    { path: "dev/null", type: "char", devmajor: 1, devminor: 3 },
    { path: "run/", type: "dir" },
    { path: "run/initctl", type: "fifo" },
    { path: "etc/hostname", content: "box\n" },
  ]);

  test("skipped without --devices: counted per layer and in total, with one warning line", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [sampleLayer(1), nodes]);
    const dest = tmp("out");
    const r = await extract([src, dest, "--json"]);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.skipped).toBe(2);
    expect(j.layers.map((l: { skipped: number }) => l.skipped)).toEqual([0, 2]);
    expect(r.stderr.trim().split("\n")).toEqual([expect.stringMatching(/2 device node\(s\)\/FIFO\(s\) skipped — pass --devices \(as root\)/)]);
    expect(existsSync(join(dest, "dev/null"))).toBe(false);
    expect(existsSync(join(dest, "run/initctl"))).toBe(false);
    const human = await extract([src, tmp("out")]);
    expect(human.stdout).toMatch(/, \d+ entries \(2 skipped\), /);
  });

  test("with --devices as root: created, nothing skipped", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [nodes]);
    const dest = tmp("out");
    const r = await extract([src, dest, "--json", "--devices"]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).skipped).toBe(0);
    expect(r.stderr).toBe("");
    expect(lstatSync(join(dest, "dev/null")).isCharacterDevice()).toBe(true);
    expect(lstatSync(join(dest, "run/initctl")).isFIFO()).toBe(true);
  });

  test("with --devices but not root: a FIFO is skipped (counted, warned), not created", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [
      buildLayerTar([
        { path: "run/", type: "dir" },
        { path: "run/initctl", type: "fifo" },
        { path: "x", content: "x" },
      ]),
    ]);
    const dest = tmp("out");
    const r = await asNobody([src, dest, "--json", "--devices"]);
    expect(r.stderr).toMatch(/^\[warn\] 1 device node\(s\)\/FIFO\(s\) skipped — not running as root/);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).skipped).toBe(1);
    expect(existsSync(join(dest, "run/initctl"))).toBe(false);
    expect(readFileSync(join(dest, "x"), "utf8")).toBe("x");
  });
});

describe("extract: unreadable input is one line (never a stack trace)", () => {
  /** Exit 3, one line naming the path and the errno code, with a hint. */
  function unreadable(r: { code: number; stderr: string }, path: string, code = "EACCES"): string {
    const line = oneLine(r);
    expect(r.code).toBe(3);
    expect(line).toContain(`${path}: `);
    expect(line).toContain(`failed: ${code} — `);
    return line;
  }

  test("an archive file the user cannot read", async () => {
    const src = tmp("img.tar");
    writeDockerArchive(src, [{ tags: ["app:1"], layers: [base] }]);
    chmodSync(src, 0o000);
    unreadable(await asNobody([src, tmp("out")]), src);
  });

  test("a layer-family member the user cannot read", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [base, top]);
    chmodSync(join(src, "2.tar"), 0o000);
    const dest = tmp("out");
    expect(unreadable(await asNobody([src, dest]), join(src, "2.tar"))).toContain("permission denied");
    expect(existsSync(dest)).toBe(false);
  });

  test("an OCI blob the user cannot read", async () => {
    const layout = new OciLayout();
    const img = layout.addImage({ layers: [compress(base, "gzip")] });
    const dir = layout.writeDir(tmp("oci"), [img.manifest]);
    const blob = join(dir, "blobs/sha256", img.layers[0]!.digest.slice(7));
    chmodSync(blob, 0o000);
    unreadable(await asNobody([dir, tmp("out")]), blob);
  });

  test("a source directory the user cannot list", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [base]);
    chmodSync(src, 0o000);
    unreadable(await asNobody([src, tmp("out")]), src);
  });
});

describe("extract: DEST and layer-family members", () => {
  test("a DEST that appears while the image resolves is never used nor removed", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [base]);
    const dest = tmp("out");
    const racer = {
      stage: (l: string) => {
        if (l.startsWith("fetch")) {
          mkdirSync(dest);
          writeFileSync(join(dest, "theirs"), "not ours");
        }
      },
      bytes: () => {},
      done: () => {},
    };
    const err = await extractImage(src, dest, { stateDir, progress: racer }).catch((e) => e);
    expect(err).toBeInstanceOf(ThinimgError);
    expect((err as ThinimgError).kind).toBe("conflict");
    expect((err as ThinimgError).message).toBe(`${dest} appeared while the image was being fetched`);
    expect(readdirSync(dest)).toEqual(["theirs"]);
  });

  test("DEST's missing parents are created", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [base, top]);
    const dest = join(tmp("new"), "a/b/out");
    const r = await extract([src, dest]);
    expect(r.code).toBe(0);
    checkTree(dest);
  });

  test("a layer-family member that is a symlink out of the directory is refused; one inside is read", async () => {
    const outside = tmp("outside.tar");
    writeFileSync(outside, base);
    const src = tmp("fam");
    mkdirSync(src);
    symlinkSync(outside, join(src, "1.tar"));
    const r = await extract([src, tmp("out")]);
    expect(r.code).toBe(3);
    expect(oneLine(r)).toContain(`${src}: 1.tar resolves outside the directory`);

    const inside = tmp("fam");
    mkdirSync(join(inside, "store"), { recursive: true });
    writeFileSync(join(inside, "store/base"), base);
    symlinkSync("store/base", join(inside, "1.tar"));
    const ok = await extract([inside, tmp("out")]);
    expect(ok.code).toBe(0);
  });
});
