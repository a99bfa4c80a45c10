// Unpack → activate → release on the real kernel (UML, dm-thin over loop devices), for every image
// format, with the activated snapshot compared entry by entry to `umoci unpack` of the same image.
// Also: a re-run does no dm work at all, shared layers are shared devices, many snapshots per image,
// and the CLI scripts end to end.
// vm-seconds: 100 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, copyFileSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { parseThinStatus } from "../../lib/dm/status.ts";
import { type CmdRecord, onCommandRecord, runOk } from "../../lib/exec.ts";
import { activate, release } from "../../lib/pipeline/activate.ts";
import { checkConsistency } from "../../lib/pipeline/consistency.ts";
import { writeDemoImages } from "../../lib/pipeline/demo-image.ts";
import { unpack } from "../../lib/pipeline/unpack.ts";
import { type Ctx, makeCtx } from "../../lib/pool/context.ts";
import { listDevices } from "../../lib/store/devices.ts";
import { getImageByName } from "../../lib/store/images.ts";
import { getLayerByChain, listLayers } from "../../lib/store/layers.ts";
import { listThinIds } from "../../lib/store/thin-ids.ts";
import { listWork, stepsOf } from "../../lib/store/work.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { buildLayerTar, compress, type TarEntry, writeDockerArchive, writeLayerFamily, writeOciLayout } from "../helpers/images.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeTestPool, type TestPool, unmountUnder } from "../helpers/pool.ts";
import { entry, gnuSparse, paxSparse, tar, dir as tarDir } from "../helpers/tarcraft.ts";
import { diffTrees, listTree } from "../helpers/tree.ts";

requireDm();

const W = mkdtempSync("/tmp/thinimg-pipeline-vm-");
const pools: TestPool[] = [];
const ctxs: Ctx[] = [];

async function freshCtx(tag: string, o: { dataSize?: string } = {}): Promise<{ ctx: Ctx; pool: TestPool }> {
  const pool = await makeTestPool({ dataSize: o.dataSize ?? "512M" });
  pools.push(pool);
  const stateDir = join(W, `state-${tag}`);
  // fault tests that ran earlier in this VM left kernel errors: start the dmesg cursor after them
  await primeKernelLogCursor(stateDir);
  const cfg = loadConfig({ stateDir, pool: pool.name, virtualSize: "256M", wait: "60s" }, {});
  const ctx = makeCtx(cfg, { command: `pipeline.test ${tag}` });
  ctxs.push(ctx);
  return { ctx, pool };
}

afterAll(async () => {
  await unmountUnder(W, ["-d"]);
  for (const c of ctxs) c.db.close();
  for (const p of pools) await p.destroy();
  Bun.spawnSync(["rm", "-rf", W]);
}, 120_000);

// ---- tree comparison (same fields as test/unit/fidelity.test.ts) ---------------------------

async function mountRo(dev: string, tag: string): Promise<string> {
  const dir = join(W, `mnt-${tag}`);
  mkdirSync(dir, { recursive: true });
  await mnt.mount(dev, dir, { readOnly: true, options: ["noload"] });
  return dir;
}

// ---- the image: three layers exercising owners, modes, links, devices, xattrs, whiteouts --------

const CAP = Buffer.from("0100000280200000000000000000000000000000", "hex");
const LONG = `usr/share/${"deep-directory-name/".repeat(6)}${"f".repeat(90)}.txt`;
const L1: TarEntry[] = [
  { path: "etc/", type: "dir" },
  { path: "etc/passwd", content: "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n" },
  { path: "etc/abs-link", type: "symlink", linkpath: "/etc/passwd" },
  { path: "usr/", type: "dir" },
  { path: "usr/bin/", type: "dir" },
  { path: "usr/bin/tool", content: "#!/bin/sh\necho tool v1\n", mode: 0o4755 },
  { path: "usr/bin/tool-link", type: "hardlink", linkpath: "usr/bin/tool" },
  { path: "usr/bin/ping", content: "ping", mode: 0o755, xattrs: { "security.capability": CAP, "user.note": "hello" } },
  { path: "bin", type: "symlink", linkpath: "usr/bin" },
  { path: "home/", type: "dir" },
  { path: "home/app/", type: "dir", mode: 0o750, uid: 1000, gid: 1000 },
  { path: "home/app/old", content: "old", uid: 1000, gid: 1000 },
  { path: "tmp/", type: "dir", mode: 0o1777 },
  { path: "dev/", type: "dir" },
  { path: "dev/null", type: "char", devmajor: 1, devminor: 3, mode: 0o666 },
  { path: "run/", type: "dir" },
  { path: "run/fifo", type: "fifo", mode: 0o600 },
  { path: LONG, content: "long name" },
  { path: "var/lib/big", content: new Uint8Array(3 * 1024 * 1024).map((_, i) => (i * 7) & 0xff) },
];
const L2: TarEntry[] = [
  { path: "etc/.wh.abs-link" },
  { path: "home/app/.wh..wh..opq" },
  { path: "home/app/new", content: "new", uid: 1000, gid: 1000, mode: 0o600 },
  { path: "usr/bin/tool", content: "#!/bin/sh\necho tool v2\n", mode: 0o4755 },
  { path: "srv/secret", content: "s", uid: 1234, gid: 5678, mode: 0o600 },
];
const L3: TarEntry[] = [
  { path: "var/empty/", type: "dir", mode: 0o700 },
  { path: "var/lib/.wh.big" },
  { path: "var/lib/big/", type: "dir" },
  { path: "var/lib/big/now-a-dir", content: "x" },
  { path: "run/fifo", content: "replaced a fifo", mode: 0o644 },
];
const layers = [L1, L2, L3].map((l) => buildLayerTar(l));

let reference = "";

beforeAll(async () => {
  const oci = join(W, "oci");
  // umoci (the reference) reads gzip but not zstd layers; zstd is exercised by the layer family
  writeOciLayout(oci, [{ layers: [layers[0]!, compress(layers[1]!, "gzip"), compress(layers[2]!, "gzip")], ref: "fid" }]);
  writeDockerArchive(join(W, "docker.tar"), [{ tags: ["fid:latest"], layers }]);
  writeLayerFamily(join(W, "family"), [layers[0]!, layers[1]!, compress(layers[2]!, "zstd")]);
  // the reference lives on ext4 (hostfs has no xattrs)
  const img = join(W, "ref.img");
  await runOk(["truncate", "-s", "128M", img]);
  await runOk(["mkfs.ext4", "-q", "-F", img]);
  mkdirSync(join(W, "ref"));
  await runOk(["mount", "-o", "loop", img, join(W, "ref")]);
  await runOk(["umoci", "unpack", "--image", `${oci}:fid`, join(W, "ref", "bundle")], { timeoutMs: 120_000 });
  reference = join(W, "ref", "bundle", "rootfs");
}, 120_000);

describe("every format → bootable ext4 snapshot whose files match umoci's", () => {
  for (const [format, source] of [
    ["oci-layout", () => join(W, "oci")],
    ["docker-archive", () => join(W, "docker.tar")],
    ["layer-family", () => join(W, "family")],
  ] as const) {
    test(format, async () => {
      const { ctx } = await freshCtx(format);
      const r = await unpack(ctx, { source: source(), name: "fid" });
      expect(r.image.format).toBe(format);
      expect(r.layers.map((l) => l.reused)).toEqual([false, false, false]);
      // one device per layer, each a distinct thin id, none left active after commit
      expect(new Set(r.layers.map((l) => l.thin_id)).size).toBe(3);
      for (const l of r.layers) expect(await dmsetup.exists(l.device_name)).toBe(false);
      const a = await activate(ctx, "fid");
      expect(a.device_path).toBe(`/dev/mapper/thinimg-${ctx.cfg.pool}-snap-${a.thin_id}`);
      const info = await dmsetup.info(a.device_name);
      expect(info?.state).toBe("ACTIVE");
      const fsType = (await runOk(["blkid", "-o", "value", "-s", "TYPE", a.device_path])).stdout.trim();
      expect(fsType).toBe("ext4");
      const dir = await mountRo(a.device_path, format);
      try {
        // ext4 adds lost+found; directory mtimes move as later layers add entries
        const opts = { dirMtimes: false, skipTop: ["lost+found"] };
        expect(diffTrees(listTree(reference, opts), listTree(dir, opts))).toEqual([]);
      } finally {
        await runOk(["umount", dir]);
      }
      await release(ctx, String(a.snapshot_id));
      expect(await dmsetup.exists(a.device_name)).toBe(false);
      const check = await checkConsistency(ctx);
      expect(check.problems).toEqual([]);
      // the released snapshot's thin id stays in the pool, recorded for GC
      expect(check.leaked.thin_ids).toEqual([a.thin_id]);
    });
  }
});

describe("sharing, idempotence, activations", () => {
  let ctx: Ctx;
  let fams: { name: string; dir: string }[];
  beforeAll(async () => {
    ({ ctx } = await freshCtx("share"));
    fams = (await writeDemoImages(join(W, "demo"))).families;
  }, 120_000);

  test("a second image sharing layers 1-3 builds only its own 2 layers, on the shared devices", async () => {
    const a = await unpack(ctx, { source: fams[0]!.dir, name: "alpha" });
    expect(a.built).toBe(5);
    const cmds: CmdRecord[] = [];
    const off = onCommandRecord((r) => cmds.push(r));
    const b = await unpack(ctx, { source: fams[1]!.dir, name: "beta" });
    off();
    expect(b.layers.map((l) => l.reused)).toEqual([true, true, true, false, false]);
    expect(b.layers.slice(0, 3).map((l) => l.device_name)).toEqual(a.layers.slice(0, 3).map((l) => l.device_name));
    // layer 4 of beta is a snapshot of the SHARED layer 3 device
    const l4 = getLayerByChain(ctx.db, ctx.cfg.pool, b.layers[3]!.chain_id)!;
    expect(listThinIds(ctx.db, ctx.cfg.pool).find((t) => t.thin_id === l4.thin_id)!.origin_thin_id).toBe(a.layers[2]!.thin_id);
    const creates = cmds.filter((c) => / message .* 0 create_(thin|snap) /.test(c.command));
    expect(creates.map((c) => c.command.replace(/.* 0 /, ""))).toEqual([
      `create_snap ${b.layers[3]!.thin_id} ${a.layers[2]!.thin_id}`,
      `create_snap ${b.layers[4]!.thin_id} ${b.layers[3]!.thin_id}`,
    ]);
    expect(cmds.some((c) => c.command.startsWith("mkfs"))).toBe(false);
    expect(listLayers(ctx.db, ctx.cfg.pool)).toHaveLength(7);
  });

  test("re-running an unpacked image runs no command at all", async () => {
    const cmds: CmdRecord[] = [];
    const off = onCommandRecord((r) => cmds.push(r));
    const r = await unpack(ctx, { source: fams[0]!.dir, name: "alpha" });
    off();
    expect(r.dm_work).toBe(false);
    expect(r.built).toBe(0);
    expect(cmds).toEqual([]);
  });

  test("many snapshots per image, each independent; release is idempotent", async () => {
    const s1 = await activate(ctx, "alpha");
    const s2 = await activate(ctx, "alpha");
    expect(s1.device_name).not.toBe(s2.device_name);
    // write into one snapshot: the other and the layers do not change
    const d1 = join(W, "mnt-rw");
    mkdirSync(d1, { recursive: true });
    await mnt.mount(s1.device_path, d1);
    await Bun.write(join(d1, "app/alpha/README"), "changed in s1\n");
    await runOk(["umount", d1]);
    const d2 = await mountRo(s2.device_path, "s2");
    expect(readFileSync(join(d2, "app/alpha/README"), "utf8")).toBe("alpha says hello\n");
    expect(readFileSync(join(d2, "etc/os-release"), "utf8")).toContain("thinimg demo");
    expect(() => lstatSync(join(d2, "etc/hostname"))).toThrow(); // whited out by layer 3
    expect(readdirSync(join(d2, "app/alpha/lib"))).toEqual(["only-this"]); // opaque dir in layer 5
    expect(lstatSync(join(d2, "usr/bin/su-demo")).mode & 0o7777).toBe(0o4755);
    // releasing a mounted snapshot is refused, with the mount point named
    await expect(release(ctx, s2.device_name)).rejects.toThrow(new RegExp(`is mounted at ${d2}`));
    await runOk(["umount", d2]);
    expect((await release(ctx, s2.device_name)).state).toBe("released");
    expect((await release(ctx, s2.device_path)).state).toBe("already_released");
    const s3 = await activate(ctx, "alpha");
    const d3 = await mountRo(s3.device_path, "s3");
    expect(readFileSync(join(d3, "app/alpha/README"), "utf8")).toBe("alpha says hello\n");
    await runOk(["umount", d3]);
    await release(ctx, String(s1.snapshot_id));
    await release(ctx, String(s3.snapshot_id));
    expect((await checkConsistency(ctx)).problems).toEqual([]);
  });

  test("scripts: unpack.ts + activate.ts + list.ts + release.ts with --json", async () => {
    const env = { ...process.env, THINIMG_STATE_DIR: ctx.cfg.stateDir, THINIMG_POOL: ctx.cfg.pool };
    const run = (args: string[]) => {
      const r = Bun.spawnSync(["bun", ...args], { env, stdout: "pipe", stderr: "pipe", cwd: join(import.meta.dir, "../..") });
      return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
    };
    const u = run(["scripts/unpack.ts", fams[1]!.dir, "--name", "beta", "--json"]);
    expect(u.code).toBe(0);
    const uj = JSON.parse(u.out);
    expect(uj).toMatchObject({ ok: true, dm_work: false, built: 0, reused: 5 });
    const a = run(["scripts/activate.ts", "beta"]);
    expect(a.code).toBe(0);
    const dev = a.out.trim();
    expect(dev).toMatch(new RegExp(`^/dev/mapper/thinimg-${ctx.cfg.pool}-snap-\\d+$`));
    const l = JSON.parse(run(["scripts/list.ts", "--json"]).out);
    expect(l.images.map((i: { name: string }) => i.name).sort()).toEqual(["alpha", "beta"]);
    expect(l.snapshots.filter((s: { state: string }) => s.state === "active").map((s: { device_path: string }) => s.device_path)).toEqual([dev]);
    expect(l.pool.status).toBe("ok");
    expect(l.layers.filter((x: { images: number }) => x.images === 2)).toHaveLength(3);
    const rel = run(["scripts/release.ts", dev, "--json"]);
    expect(JSON.parse(rel.out)).toMatchObject({ ok: true, state: "released" });
    // a layer that is not a tar: the error envelope carries what was done (layer 1 reused)
    const broken = mkdtempSync(join(tmpdir(), "thinimg-broken-"));
    copyFileSync(join(fams[1]!.dir, "1.tar"), join(broken, "1.tar"));
    writeFileSync(join(broken, "2.tar"), Buffer.alloc(4096, 0x5a));
    const f = run(["scripts/unpack.ts", broken, "--name", "broken", "--json"]);
    expect(f.code).not.toBe(0);
    const fj = JSON.parse(f.out);
    expect(fj).toMatchObject({ ok: false, error: { kind: "input" }, partial: { image: { name: "broken" }, built: 0 } });
    expect(fj.partial.layers).toHaveLength(1);
    expect(fj.partial.layers[0]).toMatchObject({ index: 0, reused: true });
    // bad input: one line, non-zero, no stack
    const bad = run(["scripts/activate.ts", "no-such-image"]);
    expect(bad.code).toBe(3);
    expect(bad.err.trim().split("\n")).toHaveLength(1);
    expect(bad.err).toContain('no image "no-such-image"');
  });
});

describe("failed activations and rebuilds leave the right record", () => {
  let ctx: Ctx;
  beforeAll(async () => {
    ({ ctx } = await freshCtx("records"));
  }, 120_000);

  test("a rebuild (new source) that fails keeps the ready image serving on its current layers", async () => {
    const good = join(W, "rb-good");
    const bad = join(W, "rb-bad");
    writeLayerFamily(good, [
      buildLayerTar([
        { path: "etc/", type: "dir" },
        { path: "etc/v", content: "v1\n" },
      ]),
    ]);
    writeLayerFamily(bad, [
      buildLayerTar([
        { path: "etc/", type: "dir" },
        { path: "etc/v", content: "v2\n" },
      ]),
      buildLayerTar([{ path: "../canary/file", content: "x" }]),
    ]);
    const first = await unpack(ctx, { source: good, name: "rb" });
    const err = (await unpack(ctx, { source: bad, name: "rb" }).catch((e) => e)) as Error;
    expect(err.message).toContain("climbs out of the root");
    // still ready, on the old source and layers, with the failure recorded
    const img = getImageByName(ctx.db, ctx.cfg.pool, "rb")!;
    expect(img).toMatchObject({ state: "ready", source: good, top_layer_id: getLayerByChain(ctx.db, ctx.cfg.pool, first.layers[0]!.chain_id)!.id });
    expect(img.error).toContain("climbs out of the root");
    const a = await activate(ctx, "rb");
    const d = await mountRo(a.device_path, "rb");
    expect(readFileSync(join(d, "etc/v"), "utf8")).toBe("v1\n");
    await runOk(["umount", d]);
    await release(ctx, String(a.snapshot_id));
  });

  test("dmsetup create fails but a device of that name is there: recorded leaked (not removed), step failed", async () => {
    // the next activation's device name is predictable: occupy it with something else
    const next = Math.max(...listThinIds(ctx.db, ctx.cfg.pool).map((t) => t.thin_id)) + 1;
    const squatter = `thinimg-${ctx.cfg.pool}-snap-${next}`;
    await runOk(["dmsetup", "create", squatter, "--table", "0 8 error"]);
    try {
      const err = (await activate(ctx, "rb").catch((e) => e)) as Error;
      expect(err).toBeInstanceOf(Error);
      const dev = listDevices(ctx.db, ctx.cfg.pool).find((x) => x.name === squatter)!;
      expect(dev.state).toBe("leaked");
      // nothing removed on the error path
      expect(await dmsetup.exists(squatter)).toBe(true);
      const work = listWork(ctx.db, ctx.cfg.pool)
        .filter((w) => w.kind === "activate")
        .at(-1)!;
      expect(work.state).toBe("failed");
      expect(JSON.parse(work.leaks!).map((l: { kind: string; ref: string }) => `${l.kind}:${l.ref}`)).toContain(`device:${squatter}`);
      expect(stepsOf(ctx.db, work.id).find((s) => s.name === "activate_device")).toMatchObject({ state: "failed" });
      expect(stepsOf(ctx.db, work.id).filter((s) => s.state === "pending")).toEqual([]);
    } finally {
      await runOk(["dmsetup", "remove", squatter]); // test teardown
    }
  });
});

describe("sparse files and non-UTF-8 names on thin devices", () => {
  test("900 MiB sparse files on a 256 MiB device cost the pool only their data; names keep their bytes", async () => {
    const { ctx } = await freshCtx("sparse");
    const MiB = 1024 * 1024;
    const regions = Array.from({ length: 40 }, (_, i) => [i * 22 * MiB + i, `region ${i}`] as [number, string]);
    const raw = Buffer.from("data/caf\xe9-\xff", "latin1"); // not UTF-8
    const l1 = tar(tarDir("data"), gnuSparse("data/old-gnu.img", 900 * MiB, regions), entry({ name: raw, data: "raw name" }));
    const l2 = tar(
      paxSparse("1.0", "data/pax.img", 900 * MiB, [
        [0, "head"],
        [900 * MiB - 4, "end!"],
      ]),
    );
    writeLayerFamily(join(W, "sparse"), [l1, compress(l2, "gzip")]);
    await unpack(ctx, { source: join(W, "sparse"), name: "sparse" });
    const a = await activate(ctx, "sparse");
    // the whole snapshot (ext4 metadata and journal included) maps far less than one file's apparent size
    const st = parseThinStatus(await dmsetup.status(a.device_name));
    expect(st.kind === "ok" && st.mappedSectors * 512 < 64 * MiB).toBe(true);
    const mnt = await mountRo(a.device_path, "sparse");
    try {
      const at = (f: string, off: number, n: number) => {
        const b = Buffer.alloc(n);
        const fd = openSync(join(mnt, f), "r");
        readSync(fd, b, 0, n, off);
        closeSync(fd);
        return b.toString("latin1");
      };
      for (const f of ["data/old-gnu.img", "data/pax.img"]) {
        expect(lstatSync(join(mnt, f)).size).toBe(900 * MiB);
        expect(lstatSync(join(mnt, f)).blocks * 512).toBeLessThan(MiB);
      }
      for (const [o, d] of regions) expect(at("data/old-gnu.img", o, d.length + 2)).toBe(`${d}\0\0`);
      expect(at("data/pax.img", 900 * MiB - 6, 6)).toBe("\0\0end!");
      expect(readFileSync(Buffer.concat([Buffer.from(`${mnt}/`), raw]), "utf8")).toBe("raw name");
    } finally {
      await runOk(["umount", mnt]);
    }
    await release(ctx, String(a.snapshot_id));
  });
});
