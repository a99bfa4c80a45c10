// applyLayerFile: a layer read from a local plain tar, hashed in the same pass — on this thread for
// small files, by a reader thread through a ring of shared buffers for big ones (which thread also
// writes the files' data and final metadata out). The tree must be the one applyLayer makes from a
// stream of the same bytes, the digest that of the whole file, and every way the file can disagree
// with what was expected, or the destination can fail, must fail the layer.
import { afterAll, beforeEach, describe, expect, test } from "bun:test";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { ThinimgError } from "../../lib/errors.ts";
import { applyLayer, applyLayerFile } from "../../lib/image/apply/index.ts";
import { extractImage } from "../../lib/image/extract.ts";
import { resolveImage } from "../../lib/image/resolve.ts";
import { dir, entry, file, gnuSparse, hardlink, pax, streamOf, symlink, tar } from "../helpers/tarcraft.ts";
import { diffTrees, listTree } from "../helpers/tree.ts";

const TMP = mkdtempSync("/tmp/thinimg-apply-file-");
let n = 0;
let root = "";
beforeEach(() => {
  root = `${TMP}/r${n++}`;
  Bun.spawnSync(["mkdir", root]);
});
afterAll(() => rmSync(TMP, { recursive: true, force: true }));

const sha = (b: Uint8Array) => `sha256:${createHash("sha256").update(b).digest("hex")}`;
/** Random content: a chunk boundary or a reused buffer that leaked into another file would show. */
const blob = (len: number) => randomBytes(len);

if (process.getuid?.() !== 0) throw new Error("these tests need root (owners, xattrs)");

/** 44 entries; every kind of file metadata the writer sets, some files replaced or linked while their writes may still be queued. */
function layerOf(big: number): Buffer {
  const parts: Buffer[] = [dir("d", { mode: 0o750 })];
  for (let i = 0; i < 34; i++) parts.push(file(`d/f${i}`, blob(1 + ((i * 37_123) % 300_000)), { mode: 0o644 }));
  parts.push(file("d/big", blob(big), { mode: 0o600 }));
  parts.push(symlink("d/link", "big"));
  parts.push(file("d/suid", blob(70_000), { mode: 0o4755, uid: 1234, gid: 4321 }));
  parts.push(entry({ name: "d/old", data: "before 1970", type: "0", mtime: -86_400, base256: true }));
  parts.push(
    gnuSparse("d/sparse", 3 * 1024 * 1024, [
      [4096, "a"],
      [2 * 1024 * 1024, blob(5000)],
    ]),
  );
  parts.push(pax({ "SCHILY.xattr.user.tag": "v", "SCHILY.xattr.security.capability": Buffer.from("0100000200200000000000000000000000000000", "hex") }));
  parts.push(file("d/cap", blob(200_000), { mode: 0o755 }));
  parts.push(hardlink("d/f1-link", "d/f1"));
  parts.push(file("d/f2", "replaced", { mode: 0o640, uid: 7 }));
  parts.push(file("d/after", "tail"));
  return tar(...parts);
}

function save(layer: Buffer): string {
  const p = `${TMP}/layer${n++}.tar`;
  writeFileSync(p, layer);
  return p;
}

async function failure(f: () => Promise<unknown>): Promise<ThinimgError> {
  try {
    await f();
  } catch (e) {
    expect(e).toBeInstanceOf(ThinimgError);
    return e as ThinimgError;
  }
  throw new Error("expected a failure");
}

describe("applyLayerFile", () => {
  for (const [what, big] of [
    ["a small file (read on this thread)", 100_000],
    ["a big file (reader thread, files spanning ring slots)", 23 * 1024 * 1024 + 777],
  ] as const) {
    test(`${what}: same tree as from a stream, digest of the whole file`, async () => {
      const layer = layerOf(big);
      const path = save(layer);
      const got = await applyLayerFile({ path, digest: sha(layer) }, root, { layerLabel: "L" });
      expect(got.digest).toBe(sha(layer));
      expect(got.bytes).toBe(layer.length);
      expect(got.entries).toBe(44);
      const ref = `${TMP}/ref${n++}`;
      Bun.spawnSync(["mkdir", ref]);
      await applyLayer(streamOf(layer, 65_536), ref, { layerLabel: "L" });
      // (the roots themselves were made at different times: their times are kept as they were)
      expect(diffTrees(listTree(ref), listTree(root)).filter((d) => !d.startsWith(".: mtime"))).toEqual([]);
      expect(readFileSync(`${root}/d/after`, "utf8")).toBe("tail");
      expect(readFileSync(`${root}/d/f2`, "utf8")).toBe("replaced");
    });
  }

  test("files written by the reader thread stay confined: a symlinked parent is resolved inside the root", async () => {
    const outside = `${TMP}/outside${n++}`;
    mkdirSync(outside);
    const layer = tar(file("pad", blob(9 * 1024 * 1024)), symlink("esc", outside), file("esc/pwned", blob(3 * 1024 * 1024)), file("esc/small", "x"));
    await applyLayerFile({ path: save(layer) }, root, { layerLabel: "L" });
    expect(readdirSync(outside)).toEqual([]);
    expect(readFileSync(`${root}${outside}/small`, "utf8")).toBe("x");
    expect(readFileSync(`${root}${outside}/pwned`).length).toBe(3 * 1024 * 1024);
  });

  test("a write that fails on the reader thread fails the layer naming the file, and leaves no fd open", async () => {
    const mnt = `${TMP}/small${n++}`;
    mkdirSync(mnt);
    Bun.spawnSync(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt]);
    try {
      const layer = tar(file("a", blob(1000)), file("huge", blob(12 * 1024 * 1024)), file("b", blob(1000)));
      const fds = readdirSync("/proc/self/fd").length;
      const e = await failure(() => applyLayerFile({ path: save(layer) }, mnt, { layerLabel: "L" }));
      expect(e.message).toBe("layer L: entry huge: write failed: ENOSPC");
      expect(e.hint).toContain("full");
      expect(readdirSync("/proc/self/fd").length).toBe(fds);
    } finally {
      Bun.spawnSync(["umount", mnt]);
    }
  });

  test("a digest that does not match fails the layer, naming both digests", async () => {
    const layer = layerOf(10 * 1024 * 1024);
    const path = save(layer);
    const wrong = sha(Buffer.from("something else"));
    const e = await failure(() => applyLayerFile({ path, digest: wrong, what: "layer 1/1 (1.tar)" }, root));
    expect(e.kind).toBe("input");
    expect(e.message).toBe(`layer 1/1 (1.tar): digest mismatch: expected ${wrong}, got ${sha(layer)}`);
  });

  test("a file shorter or longer than declared fails the layer", async () => {
    const layer = layerOf(9 * 1024 * 1024);
    const path = save(layer);
    expect((await failure(() => applyLayerFile({ path, size: layer.length + 512 }, root))).message).toContain("truncated");
    root = `${TMP}/r${n++}`;
    Bun.spawnSync(["mkdir", root]);
    expect((await failure(() => applyLayerFile({ path, size: layer.length - 512 }, root))).message).toContain("more bytes than");
  });

  test("a rule broken mid-layer stops the reader thread, and the next layer reads cleanly", async () => {
    const bad = tar(file("x", blob(12 * 1024 * 1024)), file("../escape", "no"));
    const e = await failure(() => applyLayerFile({ path: save(bad) }, root, { layerLabel: "L" }));
    expect(e.kind).toBe("policy");
    expect(e.message).toContain("climbs out of the root");
    const good = layerOf(12 * 1024 * 1024);
    root = `${TMP}/r${n++}`;
    Bun.spawnSync(["mkdir", root]);
    expect((await applyLayerFile({ path: save(good) }, root)).digest).toBe(sha(good));
  });

  test("a missing file is a one-line input error", async () => {
    const e = await failure(() => applyLayerFile({ path: `${TMP}/nope.tar`, size: 20 * 1024 * 1024 }, root, { layerLabel: "L" }));
    expect(e.kind).toBe("input");
    expect(e.message).toContain("reading the layer failed");
    expect(e.message).toContain("ENOENT");
  });
});

describe("a local layer family: each plain tar is read once, its digest computed as it is applied", () => {
  function family(): { dir: string; layers: Buffer[] } {
    const d = `${TMP}/fam${n++}`;
    Bun.spawnSync(["mkdir", d]);
    const layers = [layerOf(9 * 1024 * 1024), tar(file("d/f1", "changed"), file("top", "x"))];
    for (const [i, l] of layers.entries()) writeFileSync(`${d}/${i + 1}.tar`, l);
    return { dir: d, layers };
  }

  test("extract reports the sha256 of every layer applied", async () => {
    const { dir: d, layers } = family();
    const s = await extractImage(d, `${TMP}/out${n++}`, { stateDir: `${TMP}/state` });
    expect(s.layers.map((l) => l.digest)).toEqual(layers.map(sha));
    expect(s.layers.map((l) => l.diffId)).toEqual(layers.map(sha));
    expect(readFileSync(`${s.dest}/d/f1`, "utf8")).toBe("changed");
  });

  test("resolved lazily: a digest asked for before applying is computed then, and a different one settled later is refused", async () => {
    const { dir: d, layers } = family();
    const img = await resolveImage(d, { stateDir: `${TMP}/state`, lazyLocalDigests: true });
    const [a, b] = img.layers;
    expect(a!.settleDigest).toBeDefined();
    a!.settleDigest!(sha(layers[0]!));
    expect(a!.digest).toBe(sha(layers[0]!));
    expect(b!.digest).toBe(sha(layers[1]!)); // hashed on demand
    expect(() => b!.settleDigest!(sha(layers[0]!))).toThrow("digest mismatch");
    // without the option nothing changes: digests known at resolve, nothing to settle
    const eager = await resolveImage(d, { stateDir: `${TMP}/state` });
    expect(eager.layers.map((l) => [l.digest, l.settleDigest])).toEqual(layers.map((l) => [sha(l), undefined]));
  });
});
