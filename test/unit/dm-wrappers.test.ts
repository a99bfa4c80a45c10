import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import { classifyDmError, isDmError } from "../../lib/dm/errors.ts";
import { makeBackingFile } from "../../lib/dm/loop-pool.ts";
import * as losetup from "../../lib/dm/losetup.ts";
import { parseLosetupJson } from "../../lib/dm/losetup.ts";
import { mkfsExt4 } from "../../lib/dm/mkfs.ts";
import { mount, parseMountinfo, umount } from "../../lib/dm/mount.ts";
import { parsePoolTable, poolTable, thinTable } from "../../lib/dm/pool.ts";
import { parseThinDumpIds, parseThinLs } from "../../lib/dm/thintools.ts";
import { assertDmName, assertThinId } from "../../lib/dm/validate.ts";
import { type CmdResult, CommandError, type Runner, setRunner, spawnRunner } from "../../lib/exec.ts";
import { clearTimeouts } from "../../lib/lock/host-queue.ts";
import { SerialQueue } from "../../lib/util/serial-queue.ts";
import { cmdResult } from "../helpers/run.ts";

const res = (argv: string[], exitCode: number, stderr = "", stdout = "", timedOut = false): CmdResult =>
  cmdResult(argv, { exitCode, stderr, stdout, timedOut });

afterEach(() => {
  setRunner(spawnRunner);
  clearTimeouts(); // each test is its own "run": a device that timed out in one is fresh in the next
});

describe("error typing from real dmsetup stderr", () => {
  const cases: [string, ReturnType<typeof classifyDmError>][] = [
    ["device-mapper: message ioctl on pool  failed: File exists\nCommand failed.", "exists"],
    ["device-mapper: message ioctl on pool  failed: No data available\nCommand failed.", "not_found"],
    ["Device does not exist.\nCommand failed.", "not_found"],
    ["device-mapper: remove ioctl on x  failed: No such device or address", "not_found"],
    ["device-mapper: remove ioctl on thin1  failed: Device or resource busy\nCommand failed.", "busy"],
    ["device-mapper: message ioctl on pool  failed: No space left on device", "no_space"],
    ["device-mapper: message ioctl on pool  failed: Invalid argument", "other"],
  ];
  for (const [stderr, kind] of cases) {
    test(`${kind}: ${stderr.split("\n")[0]}`, () => expect(classifyDmError(res(["dmsetup"], 1, stderr))).toBe(kind));
  }
  test("timeout wins over stderr", () => expect(classifyDmError(res(["dmsetup"], 1, "busy", "", true))).toBe("timeout"));

  test("a tool that cannot run, or a kernel without device-mapper, is 'missing' — never 'not_found'", () => {
    expect(classifyDmError(res(["dmsetup", "info", "x"], 127, 'Executable not found in $PATH: "dmsetup"'))).toBe("missing");
    expect(classifyDmError(res(["losetup", "--list"], 127, "ENOENT: No such file or directory, posix_spawn 'losetup'"))).toBe("missing");
    const noDm =
      "/dev/mapper/control: open failed: No such device\nFailure to communicate with kernel device-mapper driver.\nCheck that device-mapper is available in the kernel.\nCommand failed.";
    expect(classifyDmError(res(["dmsetup", "info", "x"], 1, noDm))).toBe("missing");
    expect(classifyDmError(res(["dmsetup", "status", "x"], 1, "/dev/mapper/control: open failed: No such file or directory"))).toBe("missing");
  });

  test("not_found for dmsetup only on dm's own answers; a stray 'No such file' is not a missing device", () => {
    expect(classifyDmError(res(["dmsetup", "info", "x"], 1, "Device does not exist.\nCommand failed."))).toBe("not_found");
    expect(classifyDmError(res(["dmsetup", "info", "x"], 1, "Device x does not exist.\nCommand failed."))).toBe("not_found");
    expect(classifyDmError(res(["dmsetup", "resume", "x"], 1, "device-mapper: resume ioctl on x  failed: No such device\nCommand failed."))).toBe("not_found");
    expect(classifyDmError(res(["dmsetup", "create", "x"], 1, "some/file: No such file or directory"))).toBe("other");
    expect(classifyDmError(res(["dmsetup", "status", "x"], 1, "not found"))).toBe("other");
  });

  const tools: [string[], string, ReturnType<typeof classifyDmError>][] = [
    [["losetup", "--detach", "/dev/loop7"], "losetup: /dev/loop7: detach failed: No such device or address", "not_found"],
    [["losetup", "--find", "--show", "/x"], "losetup: /x: failed to set up loop device: No such file or directory", "not_found"],
    [["losetup", "--find", "--show", "/x"], "losetup: /x: failed to set up loop device: Device or resource busy", "busy"],
    [["umount", "/m"], "umount: /m: not mounted.", "not_found"],
    [["umount", "/m"], "umount: /m: target is busy.", "busy"],
    [["umount", "/m"], "umount: /m: Input/output error", "io"],
    [["mount", "/dev/x", "/m"], "mount: /m: special device /dev/x does not exist.", "not_found"],
    [["mount", "/dev/x", "/m"], "mount: /m: cannot mount /dev/x read-only.\nRead-only file system", "io"],
    [["mkfs.ext4", "/dev/x"], "mkfs.ext4: Input/output error while writing out and closing file system", "io"],
    [["mkfs.ext4", "/dev/x"], "mkfs.ext4: No space left on device while writing out and closing file system", "no_space"],
  ];
  for (const [argv, stderr, kind] of tools) {
    test(`${argv[0]} → ${kind}: ${stderr.split("\n").at(-1)}`, () => expect(classifyDmError(res(argv, 1, stderr))).toBe(kind));
  }
});

describe("missing tool or no device-mapper raises; it is not an absent device", () => {
  test("info()/exists() throw 'missing' for a kernel without dm and for a dmsetup that cannot run", async () => {
    let stderr = "";
    let code = 1;
    setRunner(async (argv) => res(argv, code, stderr));
    stderr = "/dev/mapper/control: open failed: No such device\nFailure to communicate with kernel device-mapper driver.\nCommand failed.";
    const e = await dmsetup.info("x").catch((x) => x);
    expect(isDmError(e, "missing")).toBe(true);
    expect([e.kind, e.exitCode]).toEqual(["missing", 7]);
    expect(e.oneLine()).toMatch(/: Failure to communicate with kernel device-mapper driver\. — install the tool .*modprobe dm-thin-pool/);
    await expect(dmsetup.exists("x")).rejects.toThrow(/device-mapper driver/);
    stderr = "Device does not exist.\nCommand failed.";
    expect(await dmsetup.info("x")).toBeNull();
    expect(await dmsetup.exists("x")).toBe(false);
    // the real exec path: no dmsetup on PATH → exit 127 → missing
    setRunner(spawnRunner);
    code = 0;
    const path = process.env.PATH;
    process.env.PATH = "/nonexistent-thinimg";
    try {
      const e2 = await dmsetup.exists("x").catch((x) => x);
      expect(isDmError(e2, "missing")).toBe(true);
      expect(e2.result.exitCode).toBe(127);
    } finally {
      process.env.PATH = path;
    }
  });
});

describe("losetup / mount / umount / mkfs throw typed errors that are still CommandErrors", () => {
  test("each wrapper: dmKind from stderr, instanceof CommandError, CLI kind dm (exit 5), 'exit N' kept in the message", async () => {
    let stderr = "";
    setRunner(async (argv) => res(argv, 32, stderr));
    stderr = "umount: /m: target is busy.";
    const busy = await umount("/m").catch((x) => x);
    expect(isDmError(busy, "busy")).toBe(true);
    expect(busy).toBeInstanceOf(CommandError);
    expect([busy.kind, busy.exitCode, busy.message]).toEqual(["dm", 5, "umount /m: exit 32: umount: /m: target is busy."]);
    stderr = "umount: /m: not mounted.";
    expect(isDmError(await umount("/m").catch((x) => x), "not_found")).toBe(true);
    stderr = "mount: /m: cannot mount /dev/x read-only.\nRead-only file system";
    expect(isDmError(await mount("/dev/x", "/m").catch((x) => x), "io")).toBe(true);
    stderr = "mkfs.ext4: No space left on device while writing out and closing file system";
    expect(isDmError(await mkfsExt4("/dev/x").catch((x) => x), "no_space")).toBe(true);
    stderr = "losetup: /dev/loop7: detach failed: No such device or address";
    expect(isDmError(await losetup.detach("/dev/loop7").catch((x) => x), "not_found")).toBe(true);
    stderr = "losetup: cannot find an unused loop device";
    const other = await losetup.attach("/x").catch((x) => x);
    expect(isDmError(other, "other")).toBe(true);
    expect(other.message).toBe("losetup --find --show /x: exit 32: losetup: cannot find an unused loop device");
  });

  test("a timeout is 'timeout' (exit 6); a tool that cannot run is 'missing' (exit 7)", async () => {
    setRunner(async (argv) => res(argv, null as unknown as number, "", "", true));
    const t = await umount("/m").catch((x) => x);
    expect([t.dmKind, t.kind, t.exitCode]).toEqual(["timeout", "timeout", 6]);
    setRunner(async (argv) => res(argv, 127, 'Executable not found in $PATH: "mkfs.ext4"'));
    const m = await mkfsExt4("/dev/x").catch((x) => x);
    expect([m.dmKind, m.kind, m.exitCode]).toEqual(["missing", "missing", 7]);
  });
});

describe("validation", () => {
  test("dm names", () => {
    expect(assertDmName("thinimg-pool-layer-12")).toBe("thinimg-pool-layer-12");
    for (const bad of ["", ".", "..", "a b", "a/b", "-x", "x;rm", "a\nb", "x".repeat(128), "$(id)"]) {
      expect(() => assertDmName(bad)).toThrow(/invalid device name/);
    }
  });
  test("thin ids are 24-bit non-negative integers", () => {
    expect(assertThinId(0)).toBe(0);
    expect(assertThinId(16777215)).toBe(16777215);
    for (const bad of [-1, 16777216, 1.5, Number.NaN]) expect(() => assertThinId(bad)).toThrow(/invalid thin device id/);
  });
  test("names are validated before any command runs", async () => {
    const calls: string[][] = [];
    setRunner(async (argv) => {
      calls.push(argv);
      return res(argv, 0);
    });
    await expect(dmsetup.remove("../etc")).rejects.toThrow(/invalid device name/);
    await expect(dmsetup.message("pool", "delete 1; reboot")).rejects.toThrow(/malformed/);
    expect(calls).toEqual([]);
  });
});

describe("dmsetup wrappers (fake runner: decisions only; the VM tests run the real ones)", () => {
  test("create on an existing name is typed 'exists', not 'busy'", async () => {
    const fake: Runner = async (argv) =>
      argv.includes("create")
        ? res(argv, 1, "device-mapper: create ioctl on thin1  failed: Device or resource busy\nCommand failed.")
        : res(argv, 0, "", "thin1|L--w|0|254|1|0|1|\n");
    setRunner(fake);
    const err = await dmsetup.create("thin1", "0 8 thin /dev/mapper/p 1").catch((e) => e);
    expect(isDmError(err, "exists")).toBe(true);
  });
  test("create that is busy for another reason stays 'busy'", async () => {
    setRunner(async (argv) => (argv.includes("create") ? res(argv, 1, "failed: Device or resource busy") : res(argv, 1, "Device does not exist.")));
    const err = await dmsetup.create("thin1", "0 8 thin /dev/mapper/p 1").catch((e) => e);
    expect(isDmError(err, "busy")).toBe(true);
  });
  test("remove never passes --force; without udev it never waits on a cookie", async () => {
    const calls: string[][] = [];
    setRunner(async (argv) => {
      calls.push(argv);
      return res(argv, 0);
    });
    const prev = process.env.DM_DISABLE_UDEV;
    process.env.DM_DISABLE_UDEV = "1";
    await dmsetup.remove("thin1");
    process.env.DM_DISABLE_UDEV = prev;
    expect(calls[0]).toEqual(["dmsetup", "--noudevsync", "remove", "thin1"]);
    expect(calls.flat()).not.toContain("--force");
  });
  test("info: null when absent, parsed attrs when present (suspended, read-only)", async () => {
    setRunner(async (argv) =>
      argv.at(-1) === "gone" ? res(argv, 1, "Device does not exist.\nCommand failed.") : res(argv, 0, "", "snap|L-sr|2|254|3|7|1|THINIMG-p-3\n"),
    );
    expect(await dmsetup.info("gone")).toBeNull();
    expect(await dmsetup.info("snap")).toEqual({
      name: "snap",
      live: true,
      inactive: false,
      state: "SUSPENDED",
      readOnly: true,
      open: 2,
      major: 254,
      minor: 3,
      eventNr: 7,
      targets: 1,
      uuid: "THINIMG-p-3",
    });
  });
  test("withSuspended resumes in finally even when the body throws", async () => {
    const calls: string[] = [];
    setRunner(async (argv) => {
      calls.push(
        argv
          .filter((a) => a !== "--noudevsync")
          .slice(1)
          .join(" "),
      );
      return res(argv, 0);
    });
    await expect(
      dmsetup.withSuspended("dev1", async () => {
        throw new Error("boom");
      }),
    ).rejects.toThrow("boom");
    expect(calls).toEqual(["suspend dev1", "resume dev1"]);
  });
  test("ls parses both output formats", () => {
    expect(dmsetup.parseLs("pool\t(254:0)\nsnap2\t(254, 1)\n")).toEqual([
      { name: "pool", major: 254, minor: 0 },
      { name: "snap2", major: 254, minor: 1 },
    ]);
    expect(dmsetup.parseLs("No devices found\n")).toEqual([]);
  });
});

describe("queue", () => {
  test("serializes operations and survives a failing one", async () => {
    const q = new SerialQueue();
    const order: string[] = [];
    let running = 0;
    let maxRunning = 0;
    const op = (name: string, ms: number, fail = false) =>
      q.run(async () => {
        running++;
        maxRunning = Math.max(maxRunning, running);
        order.push(`start ${name}`);
        await Bun.sleep(ms);
        order.push(`end ${name}`);
        running--;
        if (fail) throw new Error(name);
        return name;
      });
    const results = await Promise.allSettled([op("a", 20), op("b", 5, true), op("c", 1)]);
    expect(maxRunning).toBe(1);
    expect(order).toEqual(["start a", "end a", "start b", "end b", "start c", "end c"]);
    expect(results.map((r) => r.status)).toEqual(["fulfilled", "rejected", "fulfilled"]);
    expect(q.pending).toBe(0);
  });
});

describe("tables and tool output parsers", () => {
  test("pool table round-trips and refuses bad block sizes", () => {
    const t = poolTable({
      metaDev: "/dev/loop0",
      dataDev: "/dev/loop1",
      dataSectors: 2097152,
      blockSectors: 128,
      lowWaterMark: 1638,
      features: ["error_if_no_space"],
    });
    expect(t).toBe("0 2097152 thin-pool /dev/loop0 /dev/loop1 128 1638 1 error_if_no_space");
    expect(parsePoolTable("0 2097152 thin-pool 7:0 7:1 128 1638 1 error_if_no_space")).toMatchObject({
      blockSectors: 128,
      lowWaterMark: 1638,
      features: ["error_if_no_space"],
      metaDev: "7:0",
    });
    expect(() => poolTable({ metaDev: "/dev/loop0", dataDev: "/dev/loop1", dataSectors: 8, blockSectors: 100, lowWaterMark: 1, features: [] })).toThrow(
      /multiple of 128/,
    );
    expect(thinTable("pool", 5, 10 * 1024 ** 3)).toBe("0 20971520 thin /dev/mapper/pool 5");
    expect(() => thinTable("pool", 5, 1000)).toThrow(/multiple of 512/);
  });
  test("thin_ls, thin_dump, losetup --json, mountinfo with escapes", () => {
    expect(parseThinLs("  1      0\n  7   1024\n")).toEqual([
      { id: 1, mappedBlocks: 0 },
      { id: 7, mappedBlocks: 1024 },
    ]);
    expect(parseThinDumpIds('<superblock><device dev_id="1" mapped_blocks="0"></device><device dev_id="42"></device>')).toEqual([1, 42]);
    expect(parseLosetupJson('{"loopdevices":[{"name":"/dev/loop0","back-file":"/tmp/a b/meta (deleted)","ro":false}]}')).toEqual([
      { device: "/dev/loop0", backingFile: "/tmp/a b/meta", readOnly: false },
    ]);
    const m = parseMountinfo("36 25 254:3 / /var/lib/thin\\040img/mnt rw,nosuid,nodev shared:1 - ext4 /dev/mapper/thinimg-p-layer-3 rw\n");
    expect(m).toEqual([
      {
        mountId: 36,
        majorMinor: "254:3",
        root: "/",
        mountPoint: "/var/lib/thin img/mnt",
        options: "rw,nosuid,nodev",
        fstype: "ext4",
        source: "/dev/mapper/thinimg-p-layer-3",
        superOptions: "rw",
      },
    ]);
  });
});

describe("backing files: fallocate, and truncate only where fallocate is unsupported", () => {
  const tmp = mkdtempSync("/tmp/thinimg-backing-");
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  const fallocateSays =
    (exitCode: number, stderr: string): Runner =>
    async (argv) => {
      if (argv[0] !== "fallocate") throw new Error(`unexpected ${argv.join(" ")}`);
      writeFileSync(argv.at(-1)!, ""); // fallocate(1) creates the file before it fails
      return res(argv, exitCode, stderr);
    };

  test("no space left: a no_space error, and no sparse file of the requested size", async () => {
    setRunner(fallocateSays(1, "fallocate: fallocate failed: No space left on device"));
    const p = join(tmp, "nospace.img");
    const e = await makeBackingFile(p, 8 * 1024 * 1024).catch((x) => x);
    expect(isDmError(e, "no_space")).toBe(true);
    expect(e.oneLine()).toMatch(/No space left on device — free space on that filesystem/);
    expect(e.oneLine()).not.toContain("\n");
    expect(statSync(p).size).toBe(0);
  });

  test("any other fallocate failure (I/O error, quota) stops too", async () => {
    for (const msg of ["fallocate: fallocate failed: Input/output error", "fallocate: fallocate failed: Disk quota exceeded"]) {
      setRunner(fallocateSays(1, msg));
      const p = join(tmp, `other-${msg.length}.img`);
      await expect(makeBackingFile(p, 1024 * 1024)).rejects.toThrow(msg.split(": ").at(-1)!);
      expect(statSync(p).size).toBe(0);
    }
  });

  test("fallocate unsupported (hostfs, NFS): a sparse file of the exact size", async () => {
    setRunner(fallocateSays(1, "fallocate: fallocate failed: Operation not supported"));
    const p = join(tmp, "sparse.img");
    expect(await makeBackingFile(p, 3 * 1024 * 1024)).toBe("truncate");
    expect(statSync(p).size).toBe(3 * 1024 * 1024);
  });

  test("more than the filesystem has free is refused before anything is created", async () => {
    const calls: string[][] = [];
    setRunner(async (argv) => {
      calls.push(argv);
      return res(argv, 0);
    });
    const p = join(tmp, "huge.img");
    const e = await makeBackingFile(p, 2 ** 60).catch((x) => x);
    expect(isDmError(e, "no_space")).toBe(true);
    expect(e.message).toMatch(/not enough space: .* needed for huge\.img, .* free/);
    expect(calls).toEqual([]);
    expect(existsSync(p)).toBe(false);
  });
});

describe("withSuspended never leaves a device suspended, and never hides the first error", () => {
  /** A fake dmsetup: suspend/resume outcomes and the info attr ("L-sw" = suspended) are set per test. */
  function fakeDm(o: { suspend: "ok" | "timeout" | "fail"; resume?: "ok" | "fail"; attr: string }) {
    const calls: string[] = [];
    setRunner(async (argv) => {
      const a = argv.filter((x) => !x.startsWith("--noudev"));
      const sub = a[1]!;
      calls.push(sub);
      if (sub === "suspend") {
        if (o.suspend === "timeout") return res(argv, null as unknown as number, "", "", true);
        if (o.suspend === "fail") return res(argv, 1, "device-mapper: suspend ioctl on d  failed: Invalid argument\nCommand failed.");
      }
      if (sub === "resume" && o.resume === "fail") return res(argv, 1, "device-mapper: resume ioctl on d  failed: Input/output error\nCommand failed.");
      if (sub === "info") return res(argv, 0, "", `d|${o.attr}|0|254|3|0|1|`);
      return res(argv, 0);
    });
    return calls;
  }
  const body = async () => "fn ran";

  test("suspend timed out but landed: resumed, and the timeout is what the caller gets", async () => {
    const calls = fakeDm({ suspend: "timeout", attr: "L-sw" });
    const e = await dmsetup.withSuspended("d", body).catch((x) => x);
    expect(isDmError(e, "timeout")).toBe(true);
    expect(calls).toEqual(["suspend", "info", "resume"]);
  });

  test("suspend timed out, device still active: resumed anyway (the suspend may land later)", async () => {
    const calls = fakeDm({ suspend: "timeout", attr: "L--w" });
    await expect(dmsetup.withSuspended("d", body)).rejects.toThrow(/timed out/);
    expect(calls).toEqual(["suspend", "info", "resume"]);
  });

  test("...but not when an inactive table is waiting (a resume would swap it in)", async () => {
    const calls = fakeDm({ suspend: "timeout", attr: "LI-w" });
    await expect(dmsetup.withSuspended("d", body)).rejects.toThrow(/timed out/);
    expect(calls).toEqual(["suspend", "info"]);
  });

  test("suspend refused and the device is active: no resume, the refusal is thrown, fn never runs", async () => {
    let ran = false;
    const calls = fakeDm({ suspend: "fail", attr: "L--w" });
    await expect(dmsetup.withSuspended("d", async () => (ran = true))).rejects.toThrow(/Invalid argument/);
    expect(calls).toEqual(["suspend", "info"]);
    expect(ran).toBe(false);
  });

  test("suspend failed, resume failed too: one error naming both and the device left suspended", async () => {
    fakeDm({ suspend: "timeout", resume: "fail", attr: "L-sw" });
    const e = await dmsetup.withSuspended("d", body).catch((x) => x);
    expect(e.message).toMatch(
      /suspend d: timed out .*; then resuming d failed: .*resume d: device-mapper: resume ioctl on d {2}failed: Input\/output error — d may be left SUSPENDED/,
    );
    expect(e.hint).toContain("dmsetup resume d");
  });

  test("fn threw and resume failed: both errors, the first one first", async () => {
    fakeDm({ suspend: "ok", resume: "fail", attr: "L-sw" });
    const e = await dmsetup
      .withSuspended("d", async () => {
        throw new Error("snapshot step failed");
      })
      .catch((x) => x);
    expect(e.message).toMatch(/^snapshot step failed; then resuming d failed: .*Input\/output error — d may be left SUSPENDED$/);
    expect(e.cause.message).toBe("snapshot step failed");
  });

  test("happy path and fn failing with a good resume: suspend, fn, resume; fn's own error comes through", async () => {
    let calls = fakeDm({ suspend: "ok", attr: "L--w" });
    expect(await dmsetup.withSuspended("d", body)).toBe("fn ran");
    expect(calls).toEqual(["suspend", "resume"]);
    calls = fakeDm({ suspend: "ok", attr: "L--w" });
    await expect(dmsetup.withSuspended("d", async () => Promise.reject(new Error("inner")))).rejects.toThrow(/^inner$/);
    expect(calls).toEqual(["suspend", "resume"]);
    fakeDm({ suspend: "ok", resume: "fail", attr: "L-sw" });
    await expect(dmsetup.withSuspended("d", body)).rejects.toThrow(/resume d: .*Input\/output error/);
  });
});
