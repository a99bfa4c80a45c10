// `bun scripts/extract.ts` end to end, as a user runs it: real processes, real files, a real S3
// server; exit codes and one-line errors (never a stack trace) for bad input.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildLayerTar, compress, OciLayout, sampleLayer, withRef, writeDockerArchive, writeLayerFamily } from "../helpers/images.ts";
import { startS3, type TestS3 } from "../helpers/s3.ts";

const repo = join(import.meta.dir, "../..");
const root = mkdtempSync("/tmp/thinimg-extract-test-");
const stateDir = join(root, "state");
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const tmp = (name: string) => join(root, `${++n}-${name}`);

async function extract(args: string[], env: Record<string, string> = {}) {
  const p = Bun.spawn(["bun", "scripts/extract.ts", ...args, "--state-dir", stateDir], {
    cwd: repo,
    env: { ...process.env, THINIMG_LOG_LEVEL: "info", ...env },
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  return { code, stdout, stderr };
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
    writeDockerArchive(src, [{ tags: ["app:1"], layers: [base, compress(top, "gzip")] }, { tags: ["other:1"], layers: [base] }]);
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
    writeLayerFamily(src, [base, buildLayerTar([{ path: "ok", content: "x" }, { path: "../../escape", content: "pwned" }])]);
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

  test("an image over the total entry budget is refused after the layer that crosses it", async () => {
    const src = tmp("fam");
    writeLayerFamily(src, [sampleLayer(1), sampleLayer(2)]);
    const r = await extract([src, tmp("out"), "--max-entries", "5"]);
    expect(r.code).toBe(4);
    expect(oneLine(r)).toContain("layer 2/2 (2.tar): image total of 6 entries exceeds the limit of 5 (maxEntries)");
  });
});
