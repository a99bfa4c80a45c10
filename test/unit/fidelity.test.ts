// Fidelity: a real multi-layer image built with Debian's umoci over a root
// filesystem assembled here — owners, setuid/setgid/sticky, capabilities, hardlinks, absolute and
// climbing symlinks, devices, empty dirs, long and non-ASCII names, fixed mtimes; a second layer
// that deletes, replaces and re-owns (umoci computes the whiteouts); a third, hand-written layer
// with opaque directories (marker before and after the layer's own entries) added verbatim with
// `umoci raw add-layer`. The OCI layout, and the docker-archive skopeo makes of it, are resolved
// with resolveImage and applied with applyLayer, then compared with `umoci unpack` entry by entry:
// type, mode, owner, size, content, link target, device number, xattrs, hardlink groups, mtime.
// Zero differences. The same image goes through `bun scripts/extract.ts` as an OCI layout dir,
// an OCI layout tar, a docker-archive and a layer family, with the same result.
//
// A second block does the same against GNU tar itself: one tree archived in GNU tar's posix, gnu,
// oldgnu and ustar formats, extracted by GNU tar and by applyLayer.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  closeSync,
  ftruncateSync,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  rmSync,
  symlinkSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { runOk } from "../../lib/exec.ts";
import { fsPath, readDir } from "../../lib/image/apply/bytepath.ts";
import { applyLayer } from "../../lib/image/apply/index.ts";
import { extractImage } from "../../lib/image/extract.ts";
import { resolveImage } from "../../lib/image/resolve.ts";
import { lsetxattr, mknod, S_IFCHR, S_IFIFO } from "../../lib/util/libc.ts";
import { compress, decompress, REF_NAME } from "../helpers/images.ts";
import { run } from "../helpers/run.ts";
import { dir, file, opaque, pax, tar, whiteout } from "../helpers/tarcraft.ts";
import { diffTrees, listTree } from "../helpers/tree.ts";

if (process.getuid?.() !== 0) throw new Error("the fidelity test needs root (owners, devices, security.capability)");

const W = mkdtempSync("/tmp/thinimg-fidelity-");
afterAll(() => void Bun.spawnSync(["rm", "-rf", W]));

const sh = (argv: string[], timeoutMs = 120_000) => runOk(argv, { timeoutMs });

// cap_setuid (7) + cap_net_raw (13), permitted + effective, VFS_CAP_REVISION_2: bytes ≥ 0x80 included.
const CAP = Buffer.from("0100000280200000000000000000000000000000", "hex");
const LONG = `usr/share/${"deep-directory-name/".repeat(6)}${"f".repeat(90)}.txt`;

// tree comparison: test/helpers/tree.ts

// --- building the rootfs -----------------------------------------------------------------------

function put(root: string, rel: string, data: string | Buffer, mode: number, uid = 0, gid = 0): void {
  const p = `${root}/${rel}`;
  writeFileSync(p, data);
  chownSync(p, uid, gid);
  chmodSync(p, mode);
}
function mk(root: string, rel: string, mode: number, uid = 0, gid = 0): void {
  const p = `${root}/${rel}`;
  mkdirSync(p, { recursive: true });
  chownSync(p, uid, gid);
  chmodSync(p, mode);
}

/** Fixed, distinct mtimes for everything; directories after their contents. */
function stampTimes(root: string, base: number): void {
  let i = 0;
  // paths as byte strings: names that are not UTF-8 are stamped too
  const walk = (abs: string) => {
    const st = lstatSync(fsPath(abs));
    if (st.isDirectory())
      for (const c of readDir(abs)
        .map((d) => d.name)
        .sort())
        walk(`${abs}/${c}`);
    const t = base + 3600 * i++;
    lutimesSync(fsPath(abs), t, t);
  };
  walk(root);
}

function buildBase(r: string): void {
  for (const d of ["etc/alternatives", "usr/bin", "usr/lib", "usr/share/doc/pkg", "var/log", "var/cache/app/sub", "srv/www", "dev", "run"]) {
    mk(r, d, 0o755);
  }
  mk(r, "home/alice", 0o700, 1000, 1000);
  mk(r, "home/bob", 0o750, 1001, 100);
  mk(r, "tmp", 0o1777);
  mk(r, "var/spool/mail", 0o2775, 0, 8);
  mk(r, "opt/empty", 0o711);
  mk(r, "opt/sticky", 0o1755, 33, 33);
  mkdirSync(`${r}/${LONG.slice(0, LONG.lastIndexOf("/"))}`, { recursive: true });

  put(r, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n", 0o644);
  put(r, "etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640, 0, 42);
  put(r, "usr/bin/su", Buffer.alloc(10_000, 7), 0o4755);
  put(r, "usr/bin/wall", "wall", 0o2755, 0, 5);
  put(r, "usr/bin/ping", "ping", 0o755);
  lsetxattr(`${r}/usr/bin/ping`, "security.capability", CAP);
  put(r, "usr/bin/tool", "tool", 0o750, 0, 50);
  lsetxattr(`${r}/usr/bin/tool`, "user.comment", Buffer.from("made by the fidelity test"));
  put(r, "usr/bin/busybox", Buffer.alloc(50_000, 3), 0o755);
  linkSync(`${r}/usr/bin/busybox`, `${r}/usr/bin/ls`);
  linkSync(`${r}/usr/bin/busybox`, `${r}/usr/bin/cat`);
  put(r, "usr/lib/libx.so.1", Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 31) % 256)), 0o644);
  symlinkSync("libx.so.1", `${r}/usr/lib/libx.so`);
  symlinkSync("/usr/bin/gcc", `${r}/etc/alternatives/cc`); // absolute, dangling
  symlinkSync("../../etc/passwd", `${r}/usr/lib/climb`); // climbing
  symlinkSync("usr/lib", `${r}/lib`); // to a directory
  lchownSync(`${r}/usr/lib/climb`, 1000, 1000);
  put(r, "home/alice/.profile", "export A=1\n", 0o644, 1000, 1000);
  put(r, "home/bob/notes", "bob", 0o600, 1001, 100);
  put(r, "srv/www/index.html", "<h1>hi</h1>", 0o644, 33, 33);
  put(r, "var/log/big", Buffer.from(Array.from({ length: 1 << 20 }, (_, i) => (i * 7 + (i >> 9)) % 256)), 0o640, 0, 4);
  put(r, "var/cache/app/a", "a", 0o644);
  put(r, "var/cache/app/b", "b", 0o644);
  put(r, "var/cache/app/sub/c", "c", 0o644);
  put(r, "usr/share/doc/pkg/README", "readme", 0o644);
  put(r, "usr/share/doc/pkg/copyright", "copyright", 0o644);
  put(r, "usr/share/doc/pkg/naïve file ✓.txt", "unicode", 0o644);
  put(r, "usr/share/doc/pkg/empty", "", 0o444);
  put(r, "usr/share/doc/pkg/nobody", "n", 0o000, 65534, 65534);
  put(r, LONG, "long name", 0o644);
  mknod(`${r}/dev/null`, S_IFCHR | 0o666, 1, 3);
  chmodSync(`${r}/dev/null`, 0o666);
  mknod(`${r}/run/initctl`, S_IFIFO | 0o600, 0, 0);
  stampTimes(r, 1_500_000_000);
}

function modify(r: string): void {
  unlinkSync(`${r}/usr/share/doc/pkg/copyright`); // whiteout of a file
  rmSync(`${r}/var/cache/app/sub`, { recursive: true }); // of a tree
  unlinkSync(`${r}/etc/alternatives/cc`); // of a symlink
  unlinkSync(`${r}/usr/bin/cat`); // one link of a hardlink group
  put(r, "usr/lib/libx.so.1", "rewritten", 0o644); // new content
  rmSync(`${r}/srv/www`, { recursive: true });
  put(r, "srv/www", "a file where a directory was", 0o644, 33, 33);
  unlinkSync(`${r}/var/log/big`);
  mk(r, "var/log/big", 0o750, 0, 4); // a directory where a file was
  put(r, "var/log/big/part1", "p1", 0o640);
  chmodSync(`${r}/etc/passwd`, 0o600);
  chownSync(`${r}/home/bob/notes`, 1002, 1002);
  chmodSync(`${r}/usr/bin/su`, 0o4711);
  linkSync(`${r}/usr/bin/busybox`, `${r}/usr/bin/sh`);
  symlinkSync("/proc/self/mounts", `${r}/etc/mtab`);
  stampTimes(r, 1_600_000_000);
}

const T3 = 1_700_000_000;
/** Layer 3, hand-written: opaque directories with the marker after and before this layer's entries. */
function rawLayer(): Buffer {
  return tar(
    dir("var/cache/app", { mode: 0o755, mtime: T3 }),
    file("var/cache/app/fresh", "fresh", { mtime: T3 }),
    opaque("var/cache/app"), // after: "fresh" must survive, a and b must go
    dir("usr/share/doc", { mode: 0o755, mtime: T3 }),
    opaque("usr/share/doc"), // before
    dir("usr/share/doc/new", { mode: 0o755, mtime: T3 }),
    file("usr/share/doc/new/NEWS", "news", { mtime: T3 }),
    whiteout("etc", "shadow"),
    dir("etc", { mode: 0o755, mtime: T3 }),
    pax({ "SCHILY.xattr.user.layer": "three", "SCHILY.xattr.security.capability": CAP }),
    file("usr/bin/newcap", "cap", { mode: 0o755, mtime: T3 }),
  );
}

// --- the image -----------------------------------------------------------------------------------

const OCI = `${W}/oci`;
const REF = "fid";
let umociRoot = "";

beforeAll(async () => {
  const ref = `${OCI}:${REF}`;
  await sh(["umoci", "init", "--layout", OCI]);
  await sh(["umoci", "new", "--image", ref]);
  await sh(["umoci", "unpack", "--image", ref, `${W}/bundle`]);
  const r = `${W}/bundle/rootfs`;
  buildBase(r);
  await sh(["umoci", "repack", "--refresh-bundle", "--image", ref, `${W}/bundle`]);
  modify(r);
  await sh(["umoci", "repack", "--image", ref, `${W}/bundle`]);
  writeFileSync(`${W}/layer3.tar`, rawLayer());
  await sh(["umoci", "raw", "add-layer", "--image", ref, `${W}/layer3.tar`]);
  await sh(["umoci", "unpack", "--image", ref, `${W}/reference`]);
  umociRoot = `${W}/reference/rootfs`;
}, 180_000);

async function extractWithThinimg(source: string, dest: string): Promise<{ format: string; layers: number }> {
  const image = await resolveImage(source, { stateDir: `${W}/state`, select: REF });
  mkdirSync(dest);
  for (const layer of image.layers) {
    await applyLayer(await layer.open(), dest, { devices: true, layerLabel: layer.label });
  }
  return { format: image.format, layers: image.layers.length };
}

describe("fidelity with umoci", () => {
  test("the reference tree has what the test built (the image is not trivially empty)", () => {
    const t = listTree(umociRoot);
    expect(t.get("usr/bin/su")?.mode).toBe(0o4711);
    expect(t.get("usr/bin/ping")?.xattrs).toBe(`security.capability=${CAP.toString("hex")}`);
    expect(t.get("usr/bin/ls")?.group).toBe("usr/bin/busybox|usr/bin/ls|usr/bin/sh");
    expect(t.get("etc/alternatives/cc")).toBeUndefined();
    expect(t.get("etc/shadow")).toBeUndefined();
    expect(t.get("srv/www")?.type).toBe("file");
    expect(t.get("var/log/big")?.type).toBe("dir");
    expect(t.get("dev/null")?.type).toBe("char");
    expect(t.get(LONG)?.sha).toBeDefined();
    expect(t.get("usr/lib/climb")?.link).toBe("../../etc/passwd");
    expect([...t.keys()].filter((p) => p.startsWith("var/cache/app/")).sort()).toEqual(["var/cache/app/fresh"]);
    expect([...t.keys()].filter((p) => p.startsWith("usr/share/doc/")).sort()).toEqual(["usr/share/doc/new", "usr/share/doc/new/NEWS"]);
    expect([...t.keys()].some((p) => p.includes(".wh."))).toBe(false);
  });

  test("OCI layout: applyLayer reproduces umoci unpack exactly", async () => {
    const dest = `${W}/ours-oci`;
    const r = await extractWithThinimg(OCI, dest);
    expect(r).toEqual({ format: "oci-layout", layers: 3 });
    expect(diffTrees(listTree(umociRoot), listTree(dest))).toEqual([]);
  }, 60_000);

  test("docker-archive (skopeo copy of the same image): exactly the same tree", async () => {
    const archive = `${W}/docker.tar`;
    await sh(["skopeo", "copy", `oci:${OCI}:${REF}`, `docker-archive:${archive}:${REF}:latest`]);
    const dest = `${W}/ours-docker`;
    const r = await extractWithThinimg(archive, dest);
    expect(r).toEqual({ format: "docker-archive", layers: 3 });
    expect(diffTrees(listTree(umociRoot), listTree(dest))).toEqual([]);
  }, 60_000);
});

// The whole product as a user runs it: `bun scripts/extract.ts` (a subprocess, the whole product
// path: resolve, digest and diff_id checks, budget, apply) on the same umoci image in the four
// forms an operator may have it in; each result must equal `umoci unpack`'s rootfs exactly.
describe("scripts/extract.ts reproduces umoci unpack in every form", () => {
  async function cli(source: string, dest: string, extra: string[]): Promise<{ format: string; layers: { compression: string }[] }> {
    const { out, err, code } = await run(["bun", "scripts/extract.ts", source, dest, "--devices", "--json", "--state-dir", `${W}/cli-state`, ...extra]);
    if (code !== 0) throw new Error(`extract.ts exited ${code}: ${err}`);
    expect(err).toBe("");
    return JSON.parse(out);
  }
  /** The image's layer blobs, in order, as stored in the OCI layout. */
  async function layerBlobs(): Promise<Buffer[]> {
    const index = JSON.parse(await Bun.file(`${OCI}/index.json`).text());
    const desc = index.manifests.find((m: { annotations?: Record<string, string> }) => m.annotations?.[REF_NAME] === REF);
    const manifest = JSON.parse(await Bun.file(`${OCI}/blobs/sha256/${desc.digest.slice(7)}`).text());
    return Promise.all(
      manifest.layers.map(async (l: { digest: string }) => Buffer.from(await Bun.file(`${OCI}/blobs/sha256/${l.digest.slice(7)}`).arrayBuffer())),
    );
  }

  const forms: [string, () => Promise<{ source: string; extra: string[] }>, string][] = [
    ["OCI layout directory", async () => ({ source: OCI, extra: ["--select", REF] }), "oci-layout"],
    [
      "OCI layout tar",
      async () => {
        await sh(["tar", "-C", OCI, "-cf", `${W}/oci-layout.tar`, "."]);
        return { source: `${W}/oci-layout.tar:${REF}`, extra: [] };
      },
      "oci-layout",
    ],
    [
      "docker-archive (skopeo)",
      async () => {
        await sh(["skopeo", "copy", `oci:${OCI}:${REF}`, `docker-archive:${W}/cli-docker.tar:${REF}:latest`]);
        return { source: `${W}/cli-docker.tar`, extra: ["--select", `${REF}:latest`] };
      },
      "docker-archive",
    ],
    [
      "layer family (gzip, plain, zstd)",
      async () => {
        const blobs = (await layerBlobs()).map((b) => decompress(b));
        expect(blobs.length).toBe(3);
        const fam = `${W}/family`;
        mkdirSync(fam);
        writeFileSync(`${fam}/1.tar`, compress(blobs[0]!, "gzip"));
        writeFileSync(`${fam}/2.tar`, blobs[1]!);
        writeFileSync(`${fam}/3.tar`, compress(blobs[2]!, "zstd"));
        return { source: fam, extra: [] };
      },
      "layer-family",
    ],
  ];
  for (const [label, make, format] of forms) {
    test(`${label}: zero differences (types, modes, owners, contents, links, devices, xattrs, hardlinks, mtimes)`, async () => {
      const { source, extra } = await make();
      const dest = `${W}/cli-${format}-${label.length}`;
      const r = await cli(source, dest, extra);
      expect(r.format).toBe(format);
      expect(r.layers.length).toBe(3);
      if (format === "layer-family") expect(r.layers.map((l) => l.compression)).toEqual(["gzip", "none", "zstd"]);
      const want = listTree(umociRoot);
      expect(want.get("usr/bin/ping")?.xattrs).toBe(`security.capability=${CAP.toString("hex")}`);
      expect(diffTrees(want, listTree(dest))).toEqual([]);
    }, 90_000);
  }
});

describe("fidelity with GNU tar", () => {
  const src = `${W}/gnu-src`;
  beforeAll(() => {
    mkdirSync(src);
    buildBase(src);
  });

  for (const format of ["posix", "gnu", "oldgnu", "ustar"] as const) {
    test(`${format} format: applyLayer and GNU tar extract the same tree`, async () => {
      // ustar cannot store the long name; GNU tar only stores xattrs in posix (PAX) archives.
      const exclude = format === "ustar" ? ["--exclude", `./${LONG.split("/").slice(0, 3).join("/")}`] : [];
      const archive = `${W}/gnu-${format}.tar`;
      await sh(["tar", "-C", src, `--format=${format}`, "--xattrs", "--xattrs-include=*", ...exclude, "-cf", archive, "."]);
      const ref = `${W}/gnu-ref-${format}`;
      const ours = `${W}/gnu-ours-${format}`;
      mkdirSync(ref);
      mkdirSync(ours);
      await sh(["tar", "-C", ref, "--same-owner", "-p", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xf", archive]);
      await applyLayer(Bun.file(archive).stream(), ours, { devices: true, layerLabel: format });
      const want = listTree(ref);
      expect(want.get("dev/null")?.rdev).toBe(lstatSync("/dev/null").rdev);
      expect(diffTrees(want, listTree(ours))).toEqual([]);
    }, 60_000);
  }
});

// Sparse files and names that are not UTF-8, as GNU tar writes them: old GNU sparse entries ('S',
// with extension blocks past 4 regions) and PAX sparse 0.0, 0.1 and 1.0; raw bytes in names, a
// directory name, a symlink target and a hardlink (PAX hdrcharset=BINARY in posix format). Each
// archive becomes a one-layer OCI image (umoci raw add-layer: gzip, diff_id over the tar bytes)
// that extractImage (what `bun scripts/extract.ts` runs: resolve, digest and diff_id checks,
// budgets, apply) extracts; the tree must equal `umoci unpack`'s — except for old GNU
// sparse entries, which umoci 0.4.7 refuses ("unknown typeflag '\x53'"), where GNU tar's own
// extraction is the reference. Holes must stay holes: allocated blocks are checked.
describe("fidelity: sparse files and non-UTF-8 names from GNU tar", () => {
  const src = `${W}/sparse-src`;
  const MiB = 1024 * 1024;
  /** name → apparent size, and data written at offsets (the rest is holes) */
  const SPARSE: Record<string, { size: number; data: [number, string][] }> = {
    "sparse/big": {
      size: 64 * MiB,
      data: [
        [MiB, "hello"],
        [32 * MiB, "tail"],
      ],
    },
    "sparse/holes-only": { size: 8 * MiB, data: [] },
    "sparse/many": { size: 16 * MiB, data: Array.from({ length: 30 }, (_, i) => [i * 400 * 1024, `chunk ${i}`] as [number, string]) },
    "sparse/data-at-end": { size: 4 * MiB, data: [[4 * MiB - 4, "end!"]] },
  };
  // byte strings (one char per byte): \xff\xfe and latin-1 "déjà" are not UTF-8
  const RAW = "names/\xff\xfe";
  const RAW_DIR = "names/d\xe9j\xe0";

  beforeAll(() => {
    mk(src, "sparse", 0o755);
    mk(src, "names", 0o755, 1000, 1000);
    for (const [name, s] of Object.entries(SPARSE)) {
      const fd = openSync(`${src}/${name}`, "w", 0o640);
      for (const [off, d] of s.data) writeSync(fd, d, off);
      ftruncateSync(fd, s.size);
      closeSync(fd);
      chownSync(`${src}/${name}`, 1000, 1000);
    }
    put(src, "sparse/dense", Buffer.alloc(10_000, 9), 0o644);
    writeFileSync(fsPath(`${src}/${RAW}`), "raw bytes");
    mkdirSync(fsPath(`${src}/${RAW_DIR}`));
    writeFileSync(fsPath(`${src}/${RAW_DIR}/f\x80`), "in a latin-1 directory");
    symlinkSync(fsPath("d\xe9j\xe0/f\x80"), fsPath(`${src}/names/link\xff`));
    linkSync(fsPath(`${src}/${RAW}`), fsPath(`${src}/names/hard\xfe`));
    put(src, "names/naïve ✓", "utf-8 for contrast", 0o644);
    stampTimes(src, 1_550_000_000);
  });

  // In a UTF-8 locale GNU tar puts raw name bytes in PAX path/linkpath records; hdrcharset=BINARY
  // is added to every extended header with --pax-option=hdrcharset:=BINARY (a global header would
  // be refused by umoci: "unknown typeflag '\\x67'").
  const forms: [string, string[]][] = [
    ["gnu", ["--format=gnu"]],
    ["posix-0.0", ["--format=posix", "--sparse-version=0.0"]],
    ["posix-0.1", ["--format=posix", "--sparse-version=0.1", "--pax-option=hdrcharset:=BINARY"]],
    ["posix-1.0", ["--format=posix", "--sparse-version=1.0"]],
  ];
  for (const [form, flags] of forms) {
    test(`${form}: extractImage equals the reference, holes kept, names' bytes kept`, async () => {
      const layer = `${W}/sp-${form}.tar`;
      await runOk(["tar", "-C", src, "--sparse", ...flags, "-cf", layer, "."], { timeoutMs: 60_000, env: { ...process.env, LC_ALL: "C.UTF-8" } });
      if (form === "posix-0.1") expect((await Bun.file(layer).text()).includes("hdrcharset=BINARY")).toBe(true);
      const oci = `${W}/sp-oci-${form}`;
      await sh(["umoci", "init", "--layout", oci]);
      await sh(["umoci", "new", "--image", `${oci}:t`]);
      await sh(["umoci", "raw", "add-layer", "--image", `${oci}:t`, layer]);
      let ref = `${W}/sp-ref-${form}`;
      if (form === "gnu") {
        mkdirSync(ref);
        await sh(["tar", "-C", ref, "--same-owner", "-p", "--numeric-owner", "-xf", layer]);
      } else {
        await sh(["umoci", "unpack", "--image", `${oci}:t`, ref]);
        ref = `${ref}/rootfs`;
      }
      const ours = `${W}/sp-ours-${form}`;
      const r = await extractImage(oci, ours, { stateDir: `${W}/sparse-state`, select: "t" });
      expect(r.layers.length).toBe(1);
      expect(r.layers[0]!.diffId).toBe(`sha256:${new Bun.CryptoHasher("sha256").update(await Bun.file(layer).bytes()).digest("hex")}`);

      const want = listTree(ref);
      expect(want.get("names/\\xff\\xfe")?.sha).toBeDefined(); // the reference has the raw name, escaped in the listing
      expect(want.get("names/link\\xff")?.link).toBe("d\\xe9j\\xe0/f\\x80");
      expect(want.get("sparse/big")?.size).toBe(64 * MiB);
      expect(diffTrees(want, listTree(ours))).toEqual([]);
      // the bytes themselves, not only their escaped listing
      expect(
        readdirSync(`${ours}/names`, { encoding: "buffer" })
          .map((b) => b.toString("latin1"))
          .sort(),
      ).toEqual(["d\xe9j\xe0", "hard\xfe", "link\xff", Buffer.from("naïve ✓").toString("latin1"), "\xff\xfe"].sort());
      // holes: a sparse file costs its data (a few 4 KiB blocks), never its apparent size
      for (const [name, s] of Object.entries(SPARSE)) {
        const allocated = lstatSync(`${ours}/${name}`).blocks * 512;
        expect(allocated).toBeLessThanOrEqual(s.data.length * 8192);
        if (form !== "gnu") expect(lstatSync(`${ref}/${name}`).blocks * 512).toBeGreaterThan(allocated); // umoci writes the zeros
      }
    }, 90_000);
  }
});
