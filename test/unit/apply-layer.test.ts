// Layer application semantics on hand-built archives, applied to real directories as root:
// whiteouts, opaque dirs, replacement rules, links, owners, modes, times, xattrs, devices, limits.
import { afterAll, beforeEach, describe, expect, test } from "bun:test";
import { closeSync, existsSync, lstatSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, rmSync, statSync } from "node:fs";
import { ThinimgError } from "../../lib/errors.ts";
import { type ApplyOptions, applyLayer, DEFAULT_LIMITS } from "../../lib/image/apply/index.ts";
import { lgetxattr, llistxattr } from "../../lib/util/libc.ts";
import {
  chardev,
  dir,
  entry,
  fifo,
  file,
  gnuLong,
  gnuSparse,
  hardlink,
  opaque,
  pax,
  paxSparse,
  streamOf,
  symlink,
  tar,
  whiteout,
} from "../helpers/tarcraft.ts";

if (process.getuid?.() !== 0) throw new Error("these tests need root (owners, xattrs, device nodes)");

const TMP = mkdtempSync("/tmp/thinimg-apply-");
let root = "";
let n = 0;
beforeEach(() => {
  root = `${TMP}/r${n++}`;
  Bun.spawnSync(["mkdir", root]);
});
afterAll(() => rmSync(TMP, { recursive: true, force: true }));

const T1 = 1_600_000_000;
const T2 = 1_650_000_000;

async function apply(layer: Buffer, opts: ApplyOptions = {}, chunk = 65536) {
  return applyLayer(streamOf(layer, chunk), root, { layerLabel: "L", ...opts });
}
async function fails(layer: Buffer, opts: ApplyOptions = {}): Promise<ThinimgError> {
  try {
    await apply(layer, opts);
  } catch (e) {
    expect(e).toBeInstanceOf(ThinimgError);
    return e as ThinimgError;
  }
  throw new Error("expected applyLayer to fail");
}
const p = (rel: string) => `${root}/${rel}`;
const ls = (rel = "") => readdirSync(p(rel)).sort();
const mtime = (rel: string) => Math.floor(lstatSync(p(rel)).mtimeMs / 1000);

describe("entries and metadata", () => {
  test("files, dirs, symlinks and hardlinks with exact owners, modes and times", async () => {
    const st = await apply(
      tar(
        dir("bin", { mode: 0o755, uid: 0, gid: 0, mtime: T1 }),
        file("bin/su", "su-binary", { mode: 0o4755, uid: 0, gid: 0, mtime: T1 }),
        file("bin/wall", "wall", { mode: 0o2755, uid: 0, gid: 5, mtime: T1 }),
        dir("tmp", { mode: 0o1777, mtime: T2 }),
        dir("home/alice", { mode: 0o700, uid: 1000, gid: 1000, mtime: T1 }),
        file("home/alice/notes", "hi", { mode: 0o640, uid: 1000, gid: 100, mtime: T2 }),
        file("bin/perms", "x", { mode: 0o6711, uid: 4242, gid: 4343, mtime: T1 }),
        symlink("etc/alternatives/cc", "/usr/bin/gcc", { uid: 7, gid: 8, mtime: T2 }),
        symlink("climb", "../../../../etc/passwd", { mtime: T1 }),
        hardlink("bin/su2", "bin/su"),
        dir("empty", { mode: 0o751, mtime: T1 }),
      ),
    );
    expect(st.entries).toBe(11);
    expect(readFileSync(p("bin/su"), "utf8")).toBe("su-binary");
    expect(lstatSync(p("bin/su")).mode & 0o7777).toBe(0o4755);
    expect(lstatSync(p("bin/wall")).mode & 0o7777).toBe(0o2755);
    expect(lstatSync(p("bin/wall")).gid).toBe(5);
    expect(lstatSync(p("tmp")).mode & 0o7777).toBe(0o1777);
    expect(lstatSync(p("home/alice")).mode & 0o7777).toBe(0o700);
    expect(lstatSync(p("home/alice")).uid).toBe(1000);
    expect(lstatSync(p("home/alice/notes")).gid).toBe(100);
    const perms = lstatSync(p("bin/perms"));
    expect([perms.mode & 0o7777, perms.uid, perms.gid]).toEqual([0o6711, 4242, 4343]);
    expect(readlinkSync(p("etc/alternatives/cc"))).toBe("/usr/bin/gcc");
    expect(lstatSync(p("etc/alternatives/cc")).uid).toBe(7);
    expect(mtime("etc/alternatives/cc")).toBe(T2);
    expect(readlinkSync(p("climb"))).toBe("../../../../etc/passwd");
    expect(lstatSync(p("bin/su2")).ino).toBe(lstatSync(p("bin/su")).ino);
    expect(lstatSync(p("empty")).mode & 0o7777).toBe(0o751);
    // directory times are set after their contents were written
    expect(mtime("bin")).toBe(T1);
    expect(mtime("tmp")).toBe(T2);
    expect(mtime("home/alice")).toBe(T1);
    expect(mtime("bin/su")).toBe(T1);
  });

  test("PAX path/linkpath/mtime, GNU long names, ustar prefix and base-256 numbers are read", async () => {
    const longDir = `${"d".repeat(120)}/${"e".repeat(120)}`;
    await apply(
      tar(
        pax({ path: `${longDir}/pax-file`, mtime: "1650000000.75", uid: "3000000" }),
        file("ignored-short-name", "pax"),
        gnuLong("L", `${longDir}/gnu-file`),
        file("././@LongLink", "gnu", { mtime: T1 }),
        gnuLong("K", `/${"t".repeat(200)}`),
        entry({ name: "gnu-link", type: "2", linkname: "short", format: "gnu" }),
        pax({ linkpath: `/${"u".repeat(300)}` }),
        symlink("pax-link", "short"),
        entry({ name: "in-prefix", prefix: "pre/fix", data: "prefix", type: "0" }),
        entry({ name: "big-ids", data: "b", uid: 3_000_000_000, gid: 70000, base256: true, mtime: T2 }),
      ),
      {},
      7, // chunks that split every header
    );
    expect(readFileSync(p(`${longDir}/pax-file`), "utf8")).toBe("pax");
    expect(lstatSync(p(`${longDir}/pax-file`)).uid).toBe(3000000);
    expect(lstatSync(p(`${longDir}/pax-file`)).mtimeMs).toBe(1650000000750);
    expect(readFileSync(p(`${longDir}/gnu-file`), "utf8")).toBe("gnu");
    expect(readlinkSync(p("gnu-link"))).toBe(`/${"t".repeat(200)}`);
    expect(readlinkSync(p("pax-link"))).toBe(`/${"u".repeat(300)}`);
    expect(readFileSync(p("pre/fix/in-prefix"), "utf8")).toBe("prefix");
    expect(existsSync(p("ignored-short-name"))).toBe(false);
    expect([lstatSync(p("big-ids")).uid, lstatSync(p("big-ids")).gid]).toEqual([3_000_000_000, 70000]);
  });

  test("a later entry for the same path wins; a hardlinked inode is not written through", async () => {
    await apply(tar(file("a", "one"), hardlink("b", "a"), file("a", "two", { mode: 0o600 })));
    expect(readFileSync(p("a"), "utf8")).toBe("two");
    expect(readFileSync(p("b"), "utf8")).toBe("one");
    expect(lstatSync(p("a")).mode & 0o7777).toBe(0o600);
  });

  test("a directory replaces a file and a file replaces a directory tree", async () => {
    await apply(tar(file("x", "file"), dir("y"), file("y/inner", "i"), dir("y/sub"), file("y/sub/deep", "d")));
    await apply(tar(dir("x", { mode: 0o705 }), file("x/new", "n"), file("y", "now a file")));
    expect(lstatSync(p("x")).isDirectory()).toBe(true);
    expect(lstatSync(p("x")).mode & 0o7777).toBe(0o705);
    expect(ls("x")).toEqual(["new"]);
    expect(readFileSync(p("y"), "utf8")).toBe("now a file");
  });

  test("a directory entry over an existing directory keeps its contents and updates metadata", async () => {
    await apply(tar(dir("d", { mode: 0o755, uid: 1 }), file("d/keep", "k")));
    await apply(tar(dir("d", { mode: 0o710, uid: 2, gid: 3, mtime: T2 })));
    expect(ls("d")).toEqual(["keep"]);
    const st = lstatSync(p("d"));
    expect([st.mode & 0o7777, st.uid, st.gid, Math.floor(st.mtimeMs / 1000)]).toEqual([0o710, 2, 3, T2]);
  });

  test("a symlink in the way of a directory entry is replaced, not followed", async () => {
    await apply(tar(dir("real", { mode: 0o755 }), symlink("link", "real")));
    await apply(tar(dir("link", { mode: 0o700 })));
    expect(lstatSync(p("link")).isDirectory()).toBe(true);
    expect(lstatSync(p("real")).mode & 0o7777).toBe(0o755);
  });

  test("lower directories this layer only writes into keep their times", async () => {
    await apply(tar(dir("etc", { mtime: T1 }), file("etc/a", "a", { mtime: T1 }), dir("etc/tree/sub/deeper"), dir("./", { mtime: T1 })));
    await apply(tar(file("etc/b", "b", { mtime: T2 }), whiteout("etc", "a"), whiteout("etc", "tree")));
    expect(ls("etc")).toEqual(["b"]);
    expect(mtime("etc")).toBe(T1);
    expect(mtime("")).toBe(T1); // removing a tree uses a scratch dir in the root: no trace left
    expect(ls()).toEqual(["etc"]);
  });

  test("the root entry sets the root's metadata; a dir with parents missing gets them (0755)", async () => {
    await apply(tar(dir("./", { mode: 0o750, uid: 5, mtime: T1 }), file("a/b/c", "c")));
    const st = lstatSync(root);
    expect([st.mode & 0o7777, st.uid, Math.floor(st.mtimeMs / 1000)]).toEqual([0o750, 5, T1]);
    expect(lstatSync(p("a/b")).mode & 0o7777).toBe(0o755);
  });

  test("sameOwner: false leaves the owner alone", async () => {
    await apply(tar(file("f", "x", { uid: 1234, gid: 4321 })), { sameOwner: false });
    expect(lstatSync(p("f")).uid).toBe(0);
  });

  test("xattrs from PAX, binary values included (security.capability)", async () => {
    // cap_net_bind_service+ep, v2; bytes ≥ 0x80 would not survive a text decoder
    const cap = Buffer.from("01000002000400000000000000000000000000ff", "hex");
    const bin = Buffer.from([0, 0x80, 0xff, 0x0a, 0x3d]);
    await apply(
      tar(
        pax({ "SCHILY.xattr.security.capability": cap, "SCHILY.xattr.user.bin": bin }),
        file("ping", "elf", { mode: 0o755, uid: 0 }),
        pax({ "SCHILY.xattr.user.dir": "dirval" }),
        dir("d", { mode: 0o755 }),
        pax({ "LIBARCHIVE.xattr.user.lib%20name": Buffer.from("hello").toString("base64") }),
        file("la", "x"),
      ),
    );
    expect(lgetxattr(p("ping"), "security.capability")).toEqual(cap);
    expect(lgetxattr(p("ping"), "user.bin")).toEqual(bin);
    expect(lgetxattr(p("d"), "user.dir")?.toString()).toBe("dirval");
    expect(lgetxattr(p("la"), "user.lib name")?.toString()).toBe("hello");
    // a directory entry over an existing directory describes it completely: stale xattrs go
    await apply(tar(pax({ "SCHILY.xattr.user.new": "n" }), dir("d", { mode: 0o755 })));
    expect(llistxattr(p("d")).sort()).toEqual(["user.new"]);
  });
});

describe("whiteouts", () => {
  test(".wh.NAME removes files and trees of lower layers; markers never appear", async () => {
    await apply(tar(dir("a"), file("a/x", "x"), file("a/y", "y"), dir("b"), file("b/deep", "d"), file("top", "t")));
    const st = await apply(tar(whiteout("a", "x"), whiteout("", "b"), whiteout("", "top"), whiteout("", "absent")));
    expect(st.whiteouts).toBe(4);
    expect(ls()).toEqual(["a"]);
    expect(ls("a")).toEqual(["y"]);
  });

  test("opaque directory: lower contents go, this layer's entries stay, marker first or last", async () => {
    const lower = tar(dir("d"), file("d/old", "o"), dir("d/sub"), file("d/sub/old2", "o"), dir("e"), file("e/old", "o"));
    await apply(lower);
    await apply(
      tar(
        dir("d"),
        file("d/new", "n"),
        file("d/sub/new2", "n"), // d/sub from the lower layer, written into by this one
        opaque("d"), // marker AFTER this layer's entries
        opaque("e"), // marker BEFORE this layer's entries
        file("e/new", "n"),
      ),
    );
    expect(ls("d")).toEqual(["new", "sub"]);
    expect(ls("d/sub")).toEqual(["new2"]);
    expect(ls("e")).toEqual(["new"]);
  });

  test("a whiteout never removes what this layer created, whatever the order", async () => {
    await apply(tar(file("f", "lower")));
    await apply(tar(file("f", "upper"), whiteout("", "f")));
    expect(readFileSync(p("f"), "utf8")).toBe("upper");
  });

  test("a lower directory swept by an opaque marker can still be whited out as a whole", async () => {
    await apply(tar(dir("d"), file("d/old", "o")));
    await apply(tar(opaque("d"), whiteout("", "d")));
    expect(ls()).toEqual([]);
  });

  test("whiteout of a symlink removes the link, not its target", async () => {
    await apply(tar(dir("t"), file("t/keep", "k"), symlink("l", "t")));
    await apply(tar(whiteout("", "l")));
    expect(ls()).toEqual(["t"]);
    expect(ls("t")).toEqual(["keep"]);
  });
});

describe("devices", () => {
  test("skipped without devices: true, created with it", async () => {
    const layer = tar(fifo("run/fifo", { mode: 0o620 }), chardev("dev/null", 1, 3, { mode: 0o666, mtime: T1 }));
    const off = await apply(layer);
    expect(off.skipped).toBe(2);
    expect(existsSync(p("dev/null"))).toBe(false);
    const on = await apply(layer, { devices: true });
    expect(on.skipped).toBe(0);
    expect(lstatSync(p("run/fifo")).isFIFO()).toBe(true);
    expect(lstatSync(p("run/fifo")).mode & 0o7777).toBe(0o620);
    const nul = statSync(p("dev/null"));
    expect(nul.isCharacterDevice()).toBe(true);
    expect(nul.rdev).toBe(statSync("/dev/null").rdev);
    expect(nul.mode & 0o7777).toBe(0o666);
    expect(mtime("dev/null")).toBe(T1);
  });
});

describe("limits and errors", () => {
  test("defaults are the documented ones", () => {
    expect(DEFAULT_LIMITS).toEqual({
      maxEntries: 100_000,
      maxTotalBytes: 10 * 1024 ** 3,
      maxFileBytes: 1024 ** 3,
      maxDepth: 1024,
      maxPathBytes: 4096,
    });
  });

  test("each limit stops the layer with one line naming layer, entry and rule", async () => {
    const many = tar(...Array.from({ length: 20 }, (_, i) => file(`f${i}`, "x")));
    let e = await fails(many, { limits: { maxEntries: 10 } });
    expect(e.kind).toBe("policy");
    expect(e.message).toBe("layer L: entry f10: more than 10 entries (maxEntries)");

    e = await fails(tar(file("big", Buffer.alloc(5000))), { limits: { maxFileBytes: 4096 } });
    expect(e.message).toBe("layer L: entry big: file of 5000 bytes exceeds the 4096-byte limit (maxFileBytes)");

    e = await fails(tar(file("a", Buffer.alloc(3000)), file("b", Buffer.alloc(3000))), { limits: { maxTotalBytes: 5000 } });
    expect(e.kind).toBe("policy");
    expect(e.message).toContain("maxTotalBytes");

    e = await fails(tar(file("a/b/c/d/e", "x")), { limits: { maxDepth: 4 } });
    expect(e.message).toBe("layer L: entry a/b/c/d/e: path is deeper than 4 levels (maxDepth)");

    e = await fails(tar(pax({ path: "p".repeat(200) }), file("x", "x")), { limits: { maxPathBytes: 100 } });
    expect(e.message).toBe(`layer L: entry ${"p".repeat(200)}: path is longer than 100 bytes (maxPathBytes)`);
    expect(e.message.includes("\n")).toBe(false);
  });

  test("owners that do not fit a uid_t are refused", async () => {
    const e = await fails(tar(entry({ name: "f", data: "x", uid: 2 ** 40, base256: true })));
    expect(e.message).toBe("layer L: entry f: uid/gid 1099511627776:0 out of range");
  });

  test("corrupt, truncated and non-tar input is an input error", async () => {
    const good = tar(file("a", "x".repeat(1000)), file("b", "y"));
    const bad = Buffer.from(good);
    bad[600] = 0x41; // inside a's data: fine; now break b's header
    bad[1536 + 10] = 0x5a;
    let e = await fails(bad);
    expect(e.kind).toBe("input");
    expect(e.message).toBe("layer L: corrupt tar header at offset 1536 (checksum mismatch) (after entry a)");

    e = await fails(good.subarray(0, 900));
    expect(e.message).toContain("truncated archive");

    e = await fails(Buffer.from("this is not a tar archive at all, just text ".repeat(30)));
    expect(e.message).toBe("layer L: not a tar archive (bad header checksum at offset 0)");
  });

  test("a failing source is one input line; an aborted apply cancels the source", async () => {
    async function* broken() {
      yield file("a", "x");
      throw new TypeError("connection reset");
    }
    const e = await applyLayer(broken(), root, { layerLabel: "L" }).catch((x) => x);
    expect(e).toBeInstanceOf(ThinimgError);
    expect(e.message).toBe("layer L: reading the layer failed: connection reset");

    let cancelled = false;
    let pulls = 0;
    const src = new ReadableStream<Uint8Array>({
      pull(c) {
        pulls++;
        c.enqueue(pulls === 1 ? file("../x", "x") : Buffer.alloc(512));
      },
      cancel() {
        cancelled = true;
      },
    });
    const e2 = await applyLayer(src, root, { layerLabel: "L" }).catch((x) => x);
    expect(e2.kind).toBe("policy");
    expect(cancelled).toBe(true);
    expect(pulls).toBeLessThan(10); // read-ahead is bounded
  });

  test("an empty stream and an archive without end marker are valid (as Go reads them)", async () => {
    expect((await apply(Buffer.alloc(0))).entries).toBe(0);
    await apply(file("a", "no end marker"));
    expect(readFileSync(p("a"), "utf8")).toBe("no end marker");
  });
});

/** Re-checksum a header edited in place (tests that aim past the checksum at one field). */
function resum(h: Buffer): Buffer {
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
  return h;
}
/** A one-file entry whose header is edited by `edit` (checksum fixed after). */
function edited(spec: Parameters<typeof entry>[0], edit: (h: Buffer) => void): Buffer {
  const e = entry(spec);
  edit(e.subarray(0, 512));
  resum(e.subarray(0, 512));
  return e;
}

describe("header rules: as Go's archive/tar", () => {
  test("lenient: garbage GNU atime/ctime (ignored), an old Go prefix in their place (used, if ASCII), PAX numbers with leading zeros, negative mtime", async () => {
    await apply(
      tar(
        edited({ name: "garbage-times", data: "a", format: "gnu" }, (h) => h.write("\xff\xfe garbage \x80\x81", 345, "latin1")),
        edited({ name: "f", data: "b", format: "gnu" }, (h) => h.write("old-go-prefix\0", 345, "latin1")),
        pax({ size: "0000000000000000000000003", uid: "000001001", mtime: "0001600000000.5" }),
        file("pax-zeros", "ccc"),
        entry({ name: "before-1970", data: "d", mtime: -86400, base256: true }),
      ),
      {},
      7,
    );
    expect(readFileSync(p("garbage-times"), "utf8")).toBe("a");
    expect(readFileSync(p("old-go-prefix/f"), "utf8")).toBe("b");
    expect(readFileSync(p("pax-zeros"), "utf8")).toBe("ccc");
    expect(lstatSync(p("pax-zeros")).uid).toBe(1001);
    expect(lstatSync(p("pax-zeros")).mtimeMs).toBe(1600000000500);
    expect(lstatSync(p("before-1970")).mtimeMs).toBe(-86400_000);
  });

  test("header-only types carry no data whatever their size field says", async () => {
    const d = edited({ name: "d", type: "5", mode: 0o755 }, (h) => h.write("00000001000\0", 124, "latin1"));
    await apply(tar(d, file("d/after", "read as a header")));
    expect(readFileSync(p("d/after"), "utf8")).toBe("read as a header");
  });

  test("strict: every numeric field must parse, sizes must not be negative, PAX times must be times", async () => {
    let e = await fails(tar(edited({ name: "f", data: "x" }, (h) => h.write("12x\0", 329, "latin1"))));
    expect(e.message).toBe("layer L: corrupt tar header at offset 0 (bad devmajor)");
    expect(e.details?.offset).toBe(0);
    e = await fails(
      tar(
        file("ok", "x"),
        edited({ name: "f", data: "x" }, (h) => h.write("7 7\0", 108, "latin1")),
      ),
    );
    expect(e.message).toBe("layer L: corrupt tar header at offset 1024 (bad uid) (after entry ok)");
    e = await fails(tar(pax({ size: "-5" }), file("f", "x")));
    expect(e.message).toBe("layer L: PAX size is negative at offset 512");
    e = await fails(tar(pax({ ctime: "yesterday" }), file("f", "x")));
    expect(e.message).toBe("layer L: PAX ctime is not a time at offset 512");
    expect(e.hint).toContain("corrupt");
  });

  test("valid but unimplemented features are named unsupported, not corrupt", async () => {
    let e = await fails(tar(entry({ name: "vol2", type: "M", data: "x" })));
    expect(e.message).toBe("layer L: entry vol2: multi-volume archives are not supported (continuation entry at offset 0)");
    expect(e.hint).toContain("does not support");
    expect(e.details?.unsupported).toBe(true);
    e = await fails(tar(entry({ name: "odd", type: "Z", data: "x" })));
    expect(e.message).toBe("layer L: entry odd: unsupported entry type 'Z' at offset 0");
    expect(e.hint).toContain("does not support");
  });
});

describe("GNU sparse files and names as bytes", () => {
  const MiB = 1024 * 1024;
  const regions: [number, string][] = [
    [0, "head"],
    [MiB, "middle"],
    [3 * MiB - 3, "end"],
  ];
  const expected = (size: number) => {
    const b = Buffer.alloc(size);
    for (const [o, d] of regions) b.write(d, o, "latin1");
    return b;
  };
  const many: [number, string][] = Array.from({ length: 50 }, (_, i) => [i * 65536 + i, `region ${i}`]);

  for (const [label, layer] of [
    ["old GNU 'S' (4 regions in the header)", () => gnuSparse("s", 3 * MiB, regions)],
    ["old GNU 'S' with extension blocks (50 regions)", () => gnuSparse("s", 4 * MiB, many)],
    ["PAX 0.0", () => paxSparse("0.0", "s", 3 * MiB, regions)],
    ["PAX 0.1", () => paxSparse("0.1", "s", 3 * MiB, regions)],
    ["PAX 1.0", () => paxSparse("1.0", "s", 3 * MiB, regions)],
    ["PAX 1.0 with 50 regions (a map of several blocks)", () => paxSparse("1.0", "s", 4 * MiB, many)],
  ] as [string, () => Buffer][]) {
    test(`${label}: the apparent size, the data in place, holes never written`, async () => {
      const isMany = label.includes("50");
      const st = await apply(tar(layer(), file("after", "next entry")), {}, 1000);
      const size = isMany ? 4 * MiB : 3 * MiB;
      const got = readFileSync(p("s"));
      let want = expected(size);
      if (isMany) {
        want = Buffer.alloc(size);
        for (const [o, d] of many) want.write(d, o, "latin1");
      }
      expect(got.length).toBe(size);
      expect(got.equals(want)).toBe(true);
      // each region costs at most two 4 KiB blocks; the rest stays unallocated
      expect(lstatSync(p("s")).blocks * 512).toBeLessThanOrEqual((isMany ? many : regions).length * 8192);
      expect(readFileSync(p("after"), "utf8")).toBe("next entry");
      expect(st.holes).toBe(size - (isMany ? many : regions).reduce((n, [, d]) => n + d.length, 0));
    });
  }

  test("a 9 GiB sparse disk image (base-256 real size, as GNU tar writes past 8 GiB) costs only its data", async () => {
    const size = 9 * 1024 * MiB;
    const limits = { maxFileBytes: 16 * 1024 * MiB, maxTotalBytes: 16 * 1024 * MiB };
    const st = await apply(
      tar(
        gnuSparse("vm.img", size, [
          [0, "MBR"],
          [size - 4, "tail"],
        ]),
      ),
      { limits },
    );
    expect(st.holes).toBe(size - 7);
    expect(lstatSync(p("vm.img")).size).toBe(size);
    expect(lstatSync(p("vm.img")).blocks * 512).toBeLessThanOrEqual(16384);
    const fd = openSync(p("vm.img"), "r");
    const tail = Buffer.alloc(4);
    readSync(fd, tail, 0, 4, size - 4);
    closeSync(fd);
    expect(tail.toString()).toBe("tail");
  });

  test("a sparse file of holes only, and the file budget counting the apparent size", async () => {
    // GNU tar ends every map with an empty region at the apparent size
    await apply(tar(paxSparse("0.1", "empty", 5 * MiB, [[5 * MiB, ""]])));
    expect(lstatSync(p("empty")).size).toBe(5 * MiB);
    expect(lstatSync(p("empty")).blocks).toBe(0);
    const e = await fails(tar(gnuSparse("big", 2 * MiB, [[0, "x"]])), { limits: { maxFileBytes: MiB } });
    expect(e.message).toBe(`layer L: entry big: file of ${2 * MiB} bytes exceeds the ${MiB}-byte limit (maxFileBytes)`);
  });

  test("PAX hdrcharset=BINARY and raw header bytes: names, link targets and hardlinks keep their bytes", async () => {
    const raw = (s: string) => Buffer.from(s, "latin1");
    await apply(
      tar(
        pax([
          ["hdrcharset", "BINARY"],
          ["path", raw("caf\xe9/menu\xff")],
        ]),
        file("placeholder", "pax binary"),
        entry({ name: raw("caf\xe9/raw\xfe"), data: "ustar bytes" }),
        entry({ name: raw("caf\xe9/gnu\x80"), data: "gnu bytes", format: "gnu" }),
        pax({ linkpath: raw("menu\xff") }),
        entry({ name: raw("caf\xe9-link"), type: "2", linkname: "placeholder" }),
        entry({ name: raw("hard\xfe"), type: "1", linkname: raw("caf\xe9/raw\xfe") }),
      ),
    );
    const P = (s: string) => Buffer.from(`${root}/${s}`, "latin1");
    expect(readFileSync(P("caf\xe9/menu\xff"), "utf8")).toBe("pax binary");
    expect(readFileSync(P("caf\xe9/raw\xfe"), "utf8")).toBe("ustar bytes");
    expect(readFileSync(P("caf\xe9/gnu\x80"), "utf8")).toBe("gnu bytes");
    expect(readlinkSync(P("caf\xe9-link"), { encoding: "buffer" })).toEqual(raw("menu\xff"));
    expect(lstatSync(P("hard\xfe")).ino).toBe(lstatSync(P("caf\xe9/raw\xfe")).ino);
    expect(
      readdirSync(Buffer.from(root), { encoding: "buffer" })
        .map((b) => b.toString("latin1"))
        .sort(),
    ).toEqual(["caf\xe9", "caf\xe9-link", "hard\xfe"].sort());
  });

  test("path rules apply to the bytes; messages show them escaped, valid UTF-8 as text", async () => {
    let e = await fails(tar(entry({ name: Buffer.from("a/\xff/../../../x", "latin1"), data: "x" })));
    expect(e.message).toBe('layer L: entry a/\\xff/../../../x: path climbs out of the root ("..")');
    expect(e.details?.entry).toBe("a/\\xff/../../../x");
    e = await fails(tar(pax({ path: Buffer.from("\xc3\xa9t\xe9/\xff".repeat(30), "latin1") }), file("x", "x")), {
      limits: { maxPathBytes: 100 },
    });
    expect(e.message).toStartWith("layer L: entry ét\\xe9/\\xffét\\xe9/\\xff");
    expect(e.message).toContain("path is longer than 100 bytes (maxPathBytes)");
  });
});

describe("owners under setgid directories", () => {
  test("a root-owned file or symlink keeps gid 0 in a setgid directory of a lower layer, in new directories under it, and under the root made setgid", async () => {
    await apply(tar(dir("var", { mode: 0o755 }), dir("var/mail", { mode: 0o2775, uid: 0, gid: 8 }), dir(".", { mode: 0o2755, gid: 9 })));
    expect(lstatSync(p("var/mail")).mode & 0o7777).toBe(0o2775);
    await apply(
      tar(
        file("var/mail/root", "x", { mode: 0o600, uid: 0, gid: 0 }),
        file("var/mail/sub/deeper/f", "y", { mode: 0o644, uid: 0, gid: 0 }),
        dir("var/mail/d2", { mode: 0o755, uid: 0, gid: 0 }),
        file("var/mail/d2/g", "z", { mode: 0o644, uid: 0, gid: 0 }),
        file("top", "t", { mode: 0o644, uid: 0, gid: 0 }),
        file("var/plain", "p", { mode: 0o644, uid: 0, gid: 0 }),
        symlink("var/mail/link", "root", { uid: 0, gid: 0 }),
        symlink("toplink", "top", { uid: 0, gid: 0 }),
      ),
    );
    for (const f of ["var/mail/root", "var/mail/sub/deeper/f", "var/mail/d2/g", "top", "var/plain", "var/mail/link", "toplink"]) {
      expect([f, lstatSync(p(f)).uid, lstatSync(p(f)).gid]).toEqual([f, 0, 0]);
    }
  });
});
