// Health decisions from fixtures: status lines, /proc text, kernel log records, through injected
// readers and a fake command runner. The same checks run against the real kernel in
// test/vm/health.test.ts.
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { parseInfoLine } from "../../lib/dm/dmsetup.ts";
import { parsePoolStatus } from "../../lib/dm/status.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { type CmdResult, setRunner, spawnRunner } from "../../lib/exec.ts";
import {
  acknowledgeOwnMessages,
  checkDmesg,
  classifyKernelLine,
  cursorOf,
  findNew,
  type KmsgRecord,
  ownMessagesPrefix,
  parseKmsgRecord,
} from "../../lib/health/dmesg.ts";
import { dmMajor, dmMountPoints, parseProcStat, scanDState, stuckOnDm, tiedToDm } from "../../lib/health/dstate.ts";
import type { HealthIo } from "../../lib/health/io.ts";
import { judgeIowait, parseCpuLine } from "../../lib/health/iowait.ts";
import { acknowledgeFindings } from "../../lib/health/kernel-findings.ts";
import { judgeMemory } from "../../lib/health/memory.ts";
import { checkPool, judgePool } from "../../lib/health/pool.ts";
import { assertHealthy, runHealthChecks } from "../../lib/health/run.ts";
import { judgeSuspended } from "../../lib/health/suspended.ts";
import { DEFAULT_THRESHOLDS as TH } from "../../lib/health/types.ts";
import { cmdResult } from "../helpers/run.ts";

afterEach(() => setRunner(spawnRunner));

const byName = (rs: { name: string; status: string; message: string; runbook?: string }[], n: string) => {
  const r = rs.find((x) => x.name === n);
  if (!r) throw new Error(`no ${n}`);
  return { ...r, runbook: r.runbook ?? "" };
};

// ---------------------------------------------------------------- pool
describe("pool checks from status lines", () => {
  const line = (rest: string) => `0 2097152 thin-pool ${rest}`;
  const judge = (rest: string) => judgePool("p", parsePoolStatus(line(rest)), TH);

  test("a fresh pool is all ok", () => {
    const r = judge("0 111/4096 0/16384 - rw no_discard_passdown error_if_no_space - 1638");
    expect(r.map((c) => c.name)).toEqual(["pool.exists", "pool.status", "pool.mode", "pool.needs_check", "pool.data", "pool.metadata", "pool.no_space_mode"]);
    expect(r.every((c) => c.status === "ok" && c.runbook === "")).toBe(true);
  });

  test("out_of_data_space and full data block, with the runbook step", () => {
    const r = judge("3 117/1024 1024/1024 - out_of_data_space no_discard_passdown error_if_no_space - 256");
    expect(byName(r, "pool.mode")).toMatchObject({ status: "block", message: "pool p is out_of_data_space" });
    expect(byName(r, "pool.mode").runbook).toContain("gc.ts --force");
    expect(byName(r, "pool.data").status).toBe("block");
  });

  test("read-only, needs_check, Fail and Error block", () => {
    expect(byName(judge("1 10/100 1/100 - ro discard_passdown error_if_no_space - 10"), "pool.mode").status).toBe("block");
    const nc = byName(judge("1 10/100 1/100 - rw discard_passdown error_if_no_space needs_check 10"), "pool.needs_check");
    expect(nc.status).toBe("block");
    expect(nc.runbook).toContain("bun ops/recover-pool.ts");
    expect(byName(judgePool("p", parsePoolStatus(line("Fail")), TH), "pool.status")).toMatchObject({ status: "block", message: "pool p status is Fail" });
    expect(byName(judgePool("p", parsePoolStatus(line("Error")), TH), "pool.status").status).toBe("block");
  });

  test("thresholds: warn at/over warn, block at/over block, for data and metadata separately", () => {
    expect(byName(judge("1 10/100 80/100 - rw discard_passdown error_if_no_space - 10"), "pool.data").status).toBe("warn");
    expect(byName(judge("1 10/100 79/100 - rw discard_passdown error_if_no_space - 10"), "pool.data").status).toBe("ok");
    expect(byName(judge("1 10/100 95/100 - rw discard_passdown error_if_no_space - 10"), "pool.data").status).toBe("block");
    expect(byName(judge("1 75/100 1/100 - rw discard_passdown error_if_no_space - 10"), "pool.metadata").status).toBe("warn");
    expect(byName(judge("1 90/100 1/100 - rw discard_passdown error_if_no_space - 10"), "pool.metadata").status).toBe("block");
    const custom = judgePool("p", parsePoolStatus(line("1 10/100 60/100 - rw discard_passdown error_if_no_space - 10")), {
      ...TH,
      dataWarnPct: 50,
      dataBlockPct: 60,
    });
    expect(byName(custom, "pool.data").status).toBe("block");
  });

  test("read-only with the metadata at the kernel's reserve: out of metadata space, grow it", () => {
    const r = byName(judge("1 470/512 10/100 - ro discard_passdown error_if_no_space - 10"), "pool.mode");
    expect(r).toMatchObject({ status: "block", message: "pool p is read-only (ro): out of metadata space (91.8 % used)" });
    expect(r.runbook).toContain("--grow-meta +SIZE");
    // read-only with room left (or needs_check): a metadata error, not a full device
    expect(byName(judge("1 100/512 10/100 - ro discard_passdown error_if_no_space - 10"), "pool.mode").runbook).toContain("thin_check");
    expect(byName(judge("1 470/512 10/100 - ro discard_passdown error_if_no_space needs_check 10"), "pool.mode").message).toBe("pool p is read-only (ro)");
  });

  test("queue_if_no_space warns (a full pool would hang writers)", () => {
    expect(byName(judge("1 10/100 1/100 - rw discard_passdown queue_if_no_space - 10"), "pool.no_space_mode").status).toBe("warn");
  });

  const fake = (r: Partial<CmdResult>) => setRunner(async (argv) => cmdResult(argv, r));

  test("dmsetup says no such device → pool not found", async () => {
    fake({ exitCode: 1, stderr: "Device does not exist.\nCommand failed.\n" });
    const r = await checkPool("nope", TH, 1000);
    expect(r).toHaveLength(1);
    expect(r[0]).toMatchObject({ name: "pool.exists", status: "block", message: "pool nope not found (no such device-mapper device)" });
  });

  test("dmsetup timed out → blocks as unreadable; no device-mapper → says so", async () => {
    fake({ exitCode: null, timedOut: true, signal: "SIGTERM" });
    expect((await checkPool("p", TH, 1000))[0]).toMatchObject({ name: "pool.status", status: "block" });
    expect((await checkPool("p", TH, 1000))[0]!.message).toContain("timed out");
    fake({ exitCode: 1, stderr: "/dev/mapper/control: open failed: No such device\nFailure to communicate with kernel device-mapper driver.\n" });
    expect((await checkPool("p", TH, 1000))[0]!.message).toContain("device-mapper is not available");
  });

  test("a device that is not a thin-pool blocks instead of crashing", async () => {
    fake({ stdout: "0 2048 linear \n" });
    expect((await checkPool("p", TH, 1000))[0]).toMatchObject({ name: "pool.status", status: "block" });
  });
});

describe("suspended pool or device", () => {
  const info = (name: string, attr = "L--w") => `${name}|${attr}|0|254|1|0|1|`;
  const infos = (...lines: string[]) => lines.map((l) => parseInfoLine(l)!);

  test("a suspended pool blocks, naming the state and the runbook command that resumes it", () => {
    const r = judgeSuspended("p", infos(info("p", "L-sw"), info("thinimg-p-layer-1")));
    expect(r).toMatchObject({ name: "pool.suspended", status: "block" });
    expect(r.message).toBe("pool p is SUSPENDED (dmsetup info: State SUSPENDED): every I/O on its devices waits");
    expect(r.runbook).toContain("bun ops/recover-pool.ts --dir <pool dir>");
    expect(r.runbook).toContain("docs/ops-health.md#pool-suspended");
  });

  test("a suspended thinimg device of this pool blocks; other pools' and foreign devices do not", () => {
    const r = judgeSuspended("p", infos(info("p"), info("thinimg-p-snap-7", "L-sw"), info("thinimg-q-layer-1", "L-sw"), info("other", "L-sw")));
    expect(r.status).toBe("block");
    expect(r.message).toContain("thinimg-p-snap-7");
    expect(r.message).not.toContain("thinimg-q-layer-1");
    expect(r.runbook).toContain("dmsetup resume <device>");
    expect(judgeSuspended("p", infos(info("p"), info("thinimg-q-layer-1", "L-sw"))).status).toBe("ok");
    // a missing pool is pool.exists' finding, not this one's
    expect(judgeSuspended("p", []).status).toBe("ok");
  });
});

// ---------------------------------------------------------------- memory / swap / iowait
const MEMINFO = (availKb: number, swapTotal = 0, swapFree = 0) =>
  `MemTotal:       1000000 kB\nMemFree:          10000 kB\nMemAvailable:   ${availKb} kB\nBuffers: 0 kB\nCached: 0 kB\nSwapTotal: ${swapTotal} kB\nSwapFree: ${swapFree} kB\n`;

describe("memory and swap", () => {
  test("MemAvailable below 5 % blocks, below 10 % warns", () => {
    expect(byName(judgeMemory(MEMINFO(40_000), TH), "host.memory").status).toBe("block");
    expect(byName(judgeMemory(MEMINFO(80_000), TH), "host.memory").status).toBe("warn");
    expect(byName(judgeMemory(MEMINFO(500_000), TH), "host.memory").status).toBe("ok");
    expect(byName(judgeMemory(MEMINFO(40_000), TH), "host.memory").message).toContain("4.0 %");
  });
  test("swap over 80 % blocks, over 50 % warns, no swap is fine", () => {
    expect(byName(judgeMemory(MEMINFO(500_000, 1000, 100), TH), "host.swap").status).toBe("block");
    expect(byName(judgeMemory(MEMINFO(500_000, 1000, 400), TH), "host.swap").status).toBe("warn");
    expect(byName(judgeMemory(MEMINFO(500_000, 1000, 900), TH), "host.swap").status).toBe("ok");
    expect(byName(judgeMemory(MEMINFO(500_000), TH), "host.swap").message).toBe("no swap configured");
  });
  test("old kernels without MemAvailable: free + cache", () => {
    // 20 + 10 + 10 = 40 of 1000 kB = 4 % → block; 80 of 1000 = 8 % → warn
    expect(byName(judgeMemory("MemTotal: 1000 kB\nMemFree: 20 kB\nCached: 10 kB\nBuffers: 10 kB\n", TH), "host.memory").status).toBe("block");
    expect(byName(judgeMemory("MemTotal: 1000 kB\nMemFree: 60 kB\nCached: 10 kB\nBuffers: 10 kB\n", TH), "host.memory").status).toBe("warn");
  });
});

describe("iowait", () => {
  const stat = (user: number, idle: number, iowait: number) => `cpu  ${user} 0 0 ${idle} ${iowait} 0 0 0 0 0\ncpu0 1 2 3\n`;
  test("parses the aggregate line", () => {
    expect(parseCpuLine(stat(10, 20, 5))).toEqual({ iowait: 5, total: 35 });
  });
  test("over 50 % of the window blocks, over 25 % warns", () => {
    expect(judgeIowait(stat(0, 0, 0), stat(2, 2, 6), 100, TH).status).toBe("block");
    expect(judgeIowait(stat(0, 0, 0), stat(3, 4, 3), 100, TH).status).toBe("warn");
    expect(judgeIowait(stat(0, 0, 0), stat(5, 5, 0), 100, TH).status).toBe("ok");
    expect(judgeIowait(stat(0, 0, 0), stat(2, 2, 6), 100, TH).message).toContain("iowait 60 %");
  });
  test("no ticks elapsed is not a finding", () => {
    expect(judgeIowait(stat(1, 1, 1), stat(1, 1, 1), 5, TH).status).toBe("ok");
  });
});

// ---------------------------------------------------------------- D state
describe("D-state processes tied to dm", () => {
  test("parses stat lines whose comm has spaces and parentheses", () => {
    const s = parseProcStat("4242 (my (odd) proc) D 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0\n");
    expect(s).toEqual({ pid: 4242, comm: "my (odd) proc", state: "D", starttime: 987654 });
  });
  test("ties by kernel thread name, wchan or kernel stack", () => {
    for (const c of ["kdmflush/254:3", "kworker/u4:1+dm-thin", "jbd2/dm-3-8", "kcopyd", "dm_bufio_cache", "loop3", "dmsetup", "flush-253:0"]) {
      expect(tiedToDm(c, "", "")).not.toBeNull();
    }
    expect(tiedToDm("kworker/0:1-events", "", "")).toBeNull();
    expect(tiedToDm("qemu", "dm_wait_for_completion", "")).toBe("sleeping in dm_wait_for_completion");
    expect(tiedToDm("app", "io_schedule", "[<0>] io_schedule+0x42/0x70\n[<0>] dm_bufio_read+0x10/0x20 [dm_bufio]\n")).toBe("stack dm_bufio_read");
    expect(tiedToDm("app", "io_schedule", "[<0>] io_schedule+0x42/0x70\n")).toBeNull();
  });
  test("dm major and dm-backed mount points", () => {
    expect(dmMajor("Block devices:\n  7 loop\n254 device-mapper\n259 blkext\n")).toBe(254);
    const mi = "22 1 0:15 / / rw - hostfs none rw\n40 22 254:3 / /mnt/img\\040x rw - ext4 /dev/mapper/t rw\n41 22 7:0 / /mnt/loop rw - ext4 /dev/loop0 rw\n";
    expect(dmMountPoints(mi, 254)).toEqual(["/mnt/img x"]);
  });

  const stat = (pid: number, comm: string, state: string, start = 100) => `${pid} (${comm}) ${state} 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 ${start} 0 0`;
  const fakeIo = (scans: string[][], files: Record<string, string>, fds: Record<string, Record<string, string>> = {}): HealthIo => {
    let n = 0;
    return {
      procStats: async (pids) => {
        const all = scans[Math.min(n++, scans.length - 1)]!;
        return pids ? all.filter((l) => pids.includes(l.split(" ")[0]!)) : all;
      },
      readText: async (p) => {
        const v = files[p];
        if (v === undefined) throw new Error(`ENOENT ${p}`);
        return v;
      },
      listDir: async (p) => Object.keys(fds[p] ?? {}),
      readLink: async (p) => {
        const [dir, fd] = [p.slice(0, p.lastIndexOf("/")), p.slice(p.lastIndexOf("/") + 1)];
        return fds[dir]?.[fd] ?? "";
      },
      readKmsg: async () => [],
      sleep: async () => {},
    };
  };

  test("stuck = in D in both scans (same process) and tied to dm", async () => {
    const io = fakeIo(
      [
        [stat(10, "kdmflush/254:0", "D"), stat(11, "dd", "D"), stat(12, "bash", "S"), stat(13, "kworker/u4:1+dm-thin", "D"), stat(14, "tar", "D")],
        [stat(10, "kdmflush/254:0", "D"), stat(11, "dd", "D"), stat(12, "bash", "D"), stat(13, "kworker/u4:1+dm-thin", "R"), stat(14, "tar", "D", 999)],
      ],
      { "/proc/devices": "254 device-mapper\n", "/proc/self/mountinfo": "", "/proc/11/wchan": "io_schedule" },
      { "/proc/11/fd": { "0": "/dev/dm-3", "1": "/dev/null" } },
    );
    const first = await scanDState(io);
    expect([...first.keys()].sort()).toEqual(["10:100", "11:100", "13:100", "14:100"]);
    const second = await scanDState(
      io,
      [...first.values()].map((s) => String(s.pid)),
    );
    const stuck = await stuckOnDm(io, first, second);
    // 12 was not in D first; 13 left D; 14 is a different process (new starttime) now
    expect(stuck.map((s) => [s.pid, s.why])).toEqual([
      [10, "name kdmflush/254:0"],
      [11, "has /dev/dm-3 open"],
    ]);
  });
});

// ---------------------------------------------------------------- kernel log
describe("kernel log", () => {
  test("parses /dev/kmsg records (escapes, continuation lines, facility)", () => {
    expect(parseKmsgRecord("3,1234,5678901,-;Buffer I/O error on dev dm-2, logical block 0\\x2c x\n SUBSYSTEM=block\n DEVICE=b254:2\n")).toEqual({
      facility: 0,
      level: 3,
      seq: 1234,
      tsUsec: 5678901,
      message: "Buffer I/O error on dev dm-2, logical block 0, x",
    });
    expect(parseKmsgRecord("14,7,100,-;user says hi")?.facility).toBe(1);
    expect(parseKmsgRecord("garbage")).toBeNull();
  });

  test("classifies the lines the real kernel prints (captured from the VM)", () => {
    const cases: [string, "block" | "warn" | null][] = [
      ["device-mapper: thin: 254:0: switching pool to out-of-data-space (error IO) mode", "block"],
      ["device-mapper: thin: 254:0: switching pool to read-only mode", "block"],
      ["device-mapper: thin: 254:0: switching pool to out-of-metadata-space (ro) mode", "block"],
      ["device-mapper: thin: 254:0: No free metadata blocks", "block"],
      ["device-mapper: thin: 254:0: reached low water mark for data device: sending event.", "warn"],
      ["device-mapper: thin: 254:0: switching pool to write mode", "warn"],
      ["Buffer I/O error on dev dm-2, logical block 0, async page read", "block"],
      ["device-mapper: thin: 254:0: metadata operation 'dm_pool_commit_metadata' failed: error = -5", "block"],
      ["device-mapper: block manager: validator mismatch (old=sm_bitmap vs new=btree_node) for block 429", "block"],
      ["EXT4-fs error (device dm-3): ext4_find_entry:1455: inode #2: comm ls: reading directory lblock 0", "block"],
      ["INFO: task dd:812 blocked for more than 120 seconds.", "block"],
      ["I/O error, dev loop1, sector 2048 op 0x1:(WRITE)", "warn"],
      ["device-mapper: thin: Data device (loop1) discard unsupported: Disabling discard passdown.", null],
      ["device-mapper: ioctl: error adding target to table", null],
      ["device-mapper: table: 254:3: thin: Couldn't open thin internal device", null],
      ["loop0: detected capacity change from 0 to 8192", null],
      ["EXT4-fs (dm-3): mounted filesystem with ordered data mode.", null],
    ];
    for (const [line, want] of cases) expect([line, classifyKernelLine(line)?.status ?? null]).toEqual([line, want]);
  });

  const rec = (seq: number, tsSec: number, message: string, facility = 0): KmsgRecord => ({ facility, level: 3, seq, tsUsec: tsSec * 1e6, message });
  const LOG = [
    rec(1, 10, "Buffer I/O error on dev dm-1, logical block 0, async page read"),
    rec(2, 500, "device-mapper: thin: 254:0: switching pool to read-only mode"),
    rec(3, 590, "device-mapper: thin: 254:0: reached low water mark for data device: sending event."),
    rec(4, 595, "Buffer I/O error on dev dm-9 (spoofed from userspace)", 1),
  ];

  test("with a cursor only later records count; a new boot resets it; lost records are noticed", () => {
    const base = { bootId: "b1", uptimeUsec: 600e6, lookbackMs: 60_000 };
    expect(findNew(LOG, { ...base, cursor: { boot_id: "b1", seq: 2 } }).findings.map((f) => f.seq)).toEqual([3]);
    expect(findNew(LOG, { ...base, cursor: { boot_id: "b1", seq: 4 } }).findings).toEqual([]);
    // other boot: lookback window (last 60 s: records 3; 4 is userspace)
    const other = findNew(LOG, { ...base, cursor: { boot_id: "b0", seq: 99 } });
    expect(other.findings.map((f) => f.seq)).toEqual([3]);
    expect(other.lastSeq).toBe(4);
    expect(findNew(LOG.slice(2), { ...base, cursor: { boot_id: "b1", seq: 0 } }).lost).toBe(true);
  });

  test("no cursor: the lookback window decides", () => {
    const r = findNew(LOG, { cursor: null, bootId: "b1", uptimeUsec: 600e6, lookbackMs: 200_000 });
    expect(r.findings.map((f) => [f.seq, f.status])).toEqual([
      [2, "block"],
      [3, "warn"],
    ]);
  });

  /** A host whose kernel log is `records` (live: push to it), boot "boot-1", and these /sys files. */
  const kmsgIo = (records: string[], files: Record<string, string> = {}): HealthIo => ({
    procStats: async () => [],
    listDir: async () => [],
    readLink: async () => "",
    readText: async (p) => {
      const f = { "/proc/sys/kernel/random/boot_id": "boot-1\n", "/proc/uptime": "3.00 1.00\n", ...files }[p];
      if (f === undefined) throw new Error(`ENOENT ${p}`);
      return f;
    },
    readKmsg: async () => records,
    sleep: async () => {},
  });

  const inTmp = async (fn: (dir: string) => Promise<void>) => {
    const dir = mkdtempSync("/tmp/thinimg-health-unit-");
    try {
      await fn(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
  const MIN = 60_000;
  const T0 = Date.parse("2026-12-05T12:00:00Z");

  test("a kernel error blocks every later check (any number, any caller) until an operator acknowledges it", () =>
    inTmp(async (dir) => {
      const records = [
        "6,1,1000000,-;device-mapper: ioctl: 4.47.0-ioctl initialised",
        "3,2,2000000,-;Buffer I/O error on dev dm-2, logical block 0, async page read",
      ];
      const io = kmsgIo(records, { "/sys/block/dm-2/dm/name": "pool-t1\n" });
      const at = (now: number) => checkDmesg(io, { stateDir: dir, lookbackMs: MIN, now });
      const first = await at(T0);
      expect(first.status).toBe("block");
      expect(first.message).toContain('"Buffer I/O error on dev dm-2 (pool-t1), logical block 0, async page read"');
      expect(first.message).toContain("1 s ago, new");
      expect(JSON.parse(readFileSync(`${dir}/health-kmsg.json`, "utf8"))).toEqual({ boot_id: "boot-1", seq: 2 });
      // the GC timer, an operator, another process: the cursor moves on, the finding stays
      for (let i = 1; i <= 5; i++) {
        const again = await at(T0 + i * MIN);
        expect(again.status).toBe("block");
        expect(again.details?.findings).toEqual([
          expect.objectContaining({ seq: 2, age_s: 1 + i * 60, new: false, acknowledged: false, acknowledged_by: null }),
        ]);
      }
      // the device name was taken when the line was first seen (dm-2 may be gone by now)
      const gone = kmsgIo(records);
      expect((await checkDmesg(gone, { stateDir: dir, lookbackMs: MIN, now: T0 + 6 * MIN })).message).toContain("dm-2 (pool-t1)");

      const acked = await acknowledgeFindings(dir, { by: "alice", now: T0 + 7 * MIN });
      expect(acked.map((f) => f.seq)).toEqual([2]);
      const log = readFileSync(`${dir}/health-ack.log`, "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
      expect(log).toEqual([
        expect.objectContaining({
          at: "2026-12-05T12:07:00.000Z",
          by: "alice",
          findings: [expect.objectContaining({ seq: 2, what: "I/O error on a dm device" })],
        }),
      ]);
      const after = await at(T0 + 8 * MIN);
      expect(after.status).toBe("ok");
      expect(after.details?.findings).toEqual([
        expect.objectContaining({ seq: 2, acknowledged: true, acknowledged_by: "alice", acknowledged_at: "2026-12-05T12:07:00.000Z" }),
      ]);
      expect(after.message).toContain("1 acknowledged kernel error(s)");
      // acknowledging again has nothing to do; a new error blocks again
      expect(await acknowledgeFindings(dir, { by: "alice" })).toEqual([]);
      records.push("3,3,2500000,-;device-mapper: thin: 254:0: switching pool to fail mode");
      const third = await at(T0 + 9 * MIN);
      expect(third.status).toBe("block");
      expect(third.message).toContain("switching pool to fail mode");
      expect(third.message).toMatch(/^1 kernel error\(s\) not acknowledged/);
    }));

  test("an acknowledgement covers only what a check has recorded, not lines nobody has seen yet", () =>
    inTmp(async (dir) => {
      const records = ["3,1,1000000,-;device-mapper: thin: 254:0: switching pool to read-only mode"];
      const io = kmsgIo(records);
      expect(await acknowledgeFindings(dir, { by: "bob" })).toEqual([]);
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: MIN })).status).toBe("block");
      records.push("3,2,2000000,-;Buffer I/O error on dev dm-4, logical block 9, async page read");
      expect((await acknowledgeFindings(dir, { by: "bob" })).map((f) => f.seq)).toEqual([1]);
      const r = await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      expect(r.status).toBe("block");
      expect((r.details!.findings as { seq: number; acknowledged: boolean }[]).map((f) => [f.seq, f.acknowledged])).toEqual([
        [1, true],
        [2, false],
      ]);
    }));

  test("the window: a finding stops blocking once it is that old; one first seen late still blocks once", () =>
    inTmp(async (dir) => {
      const records = ["3,1,2000000,-;Buffer I/O error on dev dm-2, logical block 0, async page read"];
      const io = kmsgIo(records);
      const at = (now: number, windowMs?: number) => checkDmesg(io, { stateDir: dir, lookbackMs: MIN, now, windowMs });
      expect((await at(T0)).status).toBe("block");
      expect((await at(T0 + 14 * MIN)).status).toBe("block"); // default window: 15 min
      const old = await at(T0 + 15 * MIN);
      expect(old.status).toBe("ok");
      expect(old.details?.findings).toEqual([]);
      // a longer window (another caller's flag) still sees it: findings are kept a day
      expect((await at(T0 + 16 * MIN, 60 * MIN)).status).toBe("block");
    }));

  test("the cursor file is rewritten only when the cursor moves (a new record or a new boot)", () =>
    inTmp(async (dir) => {
      const records = ["6,1,1000000,-;device-mapper: ioctl: 4.47.0-ioctl initialised"];
      const io = kmsgIo(records);
      const cursorFile = join(dir, "health-kmsg.json");
      const stamp = () => statSync(cursorFile).ino;
      await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      expect(JSON.parse(readFileSync(cursorFile, "utf8"))).toEqual({ boot_id: "boot-1", seq: 1 });
      const first = stamp();
      await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      expect(stamp()).toBe(first); // nothing new: the same file, not a rewritten copy
      records.push("6,2,1500000,-;loop0: detected capacity change");
      await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      expect(JSON.parse(readFileSync(cursorFile, "utf8"))).toEqual({ boot_id: "boot-1", seq: 2 });
      expect(stamp()).not.toBe(first);
      const second = stamp();
      await checkDmesg(kmsgIo(records, { "/proc/sys/kernel/random/boot_id": "boot-2\n" }), { stateDir: dir, lookbackMs: MIN });
      expect(JSON.parse(readFileSync(cursorFile, "utf8"))).toEqual({ boot_id: "boot-2", seq: 2 });
      expect(stamp()).not.toBe(second);
    }));

  test("a line logged long before any check saw it blocks the check that finds it, then only its age counts", () =>
    inTmp(async (dir) => {
      const records = ["6,1,1000000,-;device-mapper: ioctl: 4.47.0-ioctl initialised"];
      const io = kmsgIo(records, { "/proc/uptime": "1202.50 1.00\n" });
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: MIN })).status).toBe("ok");
      records.push("3,2,2500000,-;device-mapper: thin: 254:0: switching pool to read-only mode"); // 20 min ago
      const r = await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      expect(r.status).toBe("block");
      expect(r.details?.findings).toEqual([expect.objectContaining({ seq: 2, age_s: 1200, new: true })]);
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: MIN })).status).toBe("ok");
    }));

  test("window 0 keeps the old behaviour (reported once); without a state dir nothing is kept", async () => {
    await inTmp(async (dir) => {
      const io = kmsgIo(["3,1,2000000,-;Buffer I/O error on dev dm-2, logical block 0, async page read"]);
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: MIN, windowMs: 0 })).status).toBe("block");
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: MIN, windowMs: 0 })).status).toBe("ok");
    });
    const io = kmsgIo(["3,1,2000000,-;Buffer I/O error on dev dm-2, logical block 0, async page read"]);
    const r = await checkDmesg(io, { lookbackMs: MIN });
    expect(r.status).toBe("block");
    expect(r.message).toContain("no state dir");
  });

  test("checks running at once lose no finding and no acknowledgement", () =>
    inTmp(async (dir) => {
      const records: string[] = [];
      const io = kmsgIo(records);
      for (let i = 1; i <= 6; i++) {
        records.push(`3,${i},${i}000000,-;Buffer I/O error on dev dm-${i}, logical block 0, async page read`);
        await Promise.all([
          checkDmesg(io, { stateDir: dir, lookbackMs: MIN }),
          checkDmesg(io, { stateDir: dir, lookbackMs: MIN }),
          i === 3 ? acknowledgeFindings(dir, { by: "carol" }) : Promise.resolve([]),
        ]);
      }
      const r = await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      const fs = r.details?.findings as { seq: number; acknowledged: boolean }[];
      expect(fs.map((f) => f.seq)).toEqual([1, 2, 3, 4, 5, 6]);
      // the acknowledgement ran with or after the checks of round 3: 1 and 2 are acknowledged, 4–6 are not
      expect(fs.filter((f) => f.acknowledged).map((f) => f.seq)).toEqual(expect.arrayContaining([1, 2]));
      expect(fs.filter((f) => !f.acknowledged).map((f) => f.seq)).toEqual(expect.arrayContaining([4, 5, 6]));
      expect(r.status).toBe("block");
    }));

  test("a damaged findings file blocks, it does not silently unblock", () =>
    inTmp(async (dir) => {
      writeFileSync(`${dir}/health-findings.json`, "{not json");
      // a check that throws is a blocking result (runHealthChecks' bounded())
      await expect(checkDmesg(kmsgIo([]), { stateDir: dir, lookbackMs: MIN })).rejects.toThrow(`cannot read ${dir}/health-findings.json`);
    }));

  test("GC's own unmount complaints: acknowledged up to the first message that is not one of them", () => {
    const log = [
      rec(10, 1, "EXT4-fs (dm-2): unmounting filesystem."),
      rec(11, 1, "EXT4-fs error (device dm-2): ext4_put_super:1297: comm umount: Couldn't clean up the journal"),
      rec(12, 1, "Buffer I/O error on dev dm-2, logical block 0, lost sync page write"),
      rec(13, 1, "EXT4-fs error (device dm-3): ext4_find_entry:1455: inode #2: comm ls: reading directory lblock 0"),
      rec(14, 1, "EXT4-fs error (device dm-2): ext4_put_super:1297: comm umount: Couldn't clean up the journal"),
    ];
    const cursor = { boot_id: "b1", seq: 9 };
    const r = ownMessagesPrefix(log, { cursor, bootId: "b1", devices: new Set(["dm-2"]) });
    // dm-3 was not unmounted by GC: it and everything after it stay for the next check
    expect(r?.acknowledged.map((f) => f.seq)).toEqual([11, 12]);
    expect(r?.seq).toBe(12);
    expect(findNew(log, { cursor: { boot_id: "b1", seq: r!.seq }, bootId: "b1", uptimeUsec: 2e6, lookbackMs: 1000 }).findings.map((f) => f.seq)).toEqual([
      13, 14,
    ]);
    // a pool-level message is never GC's to acknowledge, even if it names the device
    const pool = [rec(10, 1, "device-mapper: thin: 254:0: switching pool to read-only mode (dm-2)"), rec(11, 1, log[1]!.message)];
    expect(ownMessagesPrefix(pool, { cursor, bootId: "b1", devices: new Set(["dm-2"]) })?.acknowledged).toEqual([]);
    // no cursor, another boot, or no devices: nothing to move
    expect(ownMessagesPrefix(log, { cursor: null, bootId: "b1", devices: new Set(["dm-2"]) })).toBeNull();
    expect(ownMessagesPrefix(log, { cursor: { boot_id: "b0", seq: 9 }, bootId: "b1", devices: new Set(["dm-2"]) })).toBeNull();
    expect(ownMessagesPrefix(log, { cursor, bootId: "b1", devices: new Set() })).toBeNull();
    // userspace writing an ext4-looking line to /dev/kmsg does not stop the walk, nor is it counted
    const spoof = [rec(10, 1, "EXT4-fs error (device dm-7): spoofed", 1), rec(11, 1, log[1]!.message)];
    expect(ownMessagesPrefix(spoof, { cursor, bootId: "b1", devices: new Set(["dm-2"]) })?.acknowledged.map((f) => f.seq)).toEqual([11]);
  });

  test("acknowledgeOwnMessages moves the saved cursor so the next check passes, never backwards", async () => {
    const dir = mkdtempSync("/tmp/thinimg-health-unit-");
    try {
      const records = ["6,1,1000000,-;device-mapper: ioctl: 4.47.0-ioctl initialised"];
      const io = kmsgIo(records);
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: 60_000 })).status).toBe("ok");
      records.push("3,2,2000000,-;EXT4-fs error (device dm-2): ext4_put_super:1297: comm umount: Couldn't clean up the journal");
      expect(await acknowledgeOwnMessages(io, dir, new Set(["dm-5"]))).toEqual([]);
      expect(await acknowledgeOwnMessages(io, dir, new Set(["dm-2"]))).toEqual([records[1]!.split(";")[1]!]);
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: 60_000 })).status).toBe("ok");
      // the same message, not caused by GC (not acknowledged): the next check blocks on it
      records.push("3,3,2500000,-;EXT4-fs error (device dm-2): ext4_put_super:1297: comm umount: Couldn't clean up the journal");
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: 60_000 })).status).toBe("block");
      // a cursor already past it is left alone
      expect(await acknowledgeOwnMessages(io, dir, new Set(["dm-2"]))).toEqual([]);
      expect(JSON.parse(readFileSync(`${dir}/health-kmsg.json`, "utf8"))).toEqual({ boot_id: "boot-1", seq: 3 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("GC's own lines that another check already kept: acknowledged by gc from the cursor GC's health check left", () =>
    inTmp(async (dir) => {
      const records = ["6,1,1000000,-;device-mapper: ioctl: 4.47.0-ioctl initialised"];
      const io = kmsgIo(records);
      const gcHealth = await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      const since = cursorOf(gcHealth);
      expect(since).toEqual({ boot_id: "boot-1", seq: 1 });
      // GC unmounts and removes dm-2; an operator's check runs before GC reads the log again
      records.push("3,2,2000000,-;EXT4-fs error (device dm-2): ext4_put_super:1297: comm umount: Couldn't clean up the journal");
      expect((await checkDmesg(io, { stateDir: dir, lookbackMs: MIN })).status).toBe("block");
      expect(await acknowledgeOwnMessages(io, dir, new Set(["dm-2"]), since)).toEqual([records[1]!.split(";")[1]!]);
      const r = await checkDmesg(io, { stateDir: dir, lookbackMs: MIN });
      expect(r.status).toBe("ok");
      expect(r.details?.findings).toEqual([expect.objectContaining({ seq: 2, acknowledged: true, acknowledged_by: expect.stringContaining("gc") })]);
    }));

  test("the window comes from --kernel-error-window, else THINIMG_KERNEL_ERROR_WINDOW, else 15 min", () => {
    expect(loadConfig({}, {}).kernelErrorWindowMs).toBe(15 * MIN);
    expect(loadConfig({}, { THINIMG_KERNEL_ERROR_WINDOW: "1h" }).kernelErrorWindowMs).toBe(60 * MIN);
    expect(loadConfig({ kernelErrorWindow: "30s" }, { THINIMG_KERNEL_ERROR_WINDOW: "1h" }).kernelErrorWindowMs).toBe(30_000);
    expect(() => loadConfig({}, { THINIMG_KERNEL_ERROR_WINDOW: "2d" })).toThrow("THINIMG_KERNEL_ERROR_WINDOW");
  });

  test("an unreadable kernel log warns, it does not pass silently", async () => {
    const io = { readKmsg: async () => Promise.reject(new Error("EPERM: operation not permitted")) } as unknown as HealthIo;
    const r = await checkDmesg(io, { lookbackMs: 1000 });
    expect(r.status).toBe("warn");
    expect(r.message).toContain("EPERM");
  });
});

// ---------------------------------------------------------------- the whole run
describe("runHealthChecks / assertHealthy", () => {
  const STAT = (io: number) => `cpu  100 0 100 1000 ${io} 0 0 0 0 0\n`;
  const hostIo = (over: Partial<HealthIo> = {}, meminfo = MEMINFO(500_000)): HealthIo => {
    return {
      procStats: async () => [],
      listDir: async () => [],
      readLink: async () => "",
      readKmsg: async () => [],
      sleep: async () => {},
      readText: async (p) => {
        if (p === "/proc/meminfo") return meminfo;
        if (p === "/proc/stat") return STAT(0);
        if (p === "/proc/uptime") return "100.0 1.0";
        if (p === "/proc/sys/kernel/random/boot_id") return "b";
        throw new Error(`ENOENT ${p}`);
      },
      ...over,
    };
  };
  const poolOk = () =>
    setRunner(async (argv) => ({
      argv,
      stdout: "0 2097152 thin-pool 0 111/4096 0/16384 - rw no_discard_passdown error_if_no_space - 1638\n",
      stderr: "",
      exitCode: 0,
      signal: null,
      timedOut: false,
      durationMs: 1,
    }));

  test("healthy host and pool: every check ok, pool checks first", async () => {
    poolOk();
    const r = await runHealthChecks({ pool: "p", io: hostIo() });
    expect(r.healthy).toBe(true);
    expect(r.pool).toBe("p");
    expect(r.checks.map((c) => c.name)).toEqual([
      "pool.exists",
      "pool.status",
      "pool.mode",
      "pool.needs_check",
      "pool.data",
      "pool.metadata",
      "pool.no_space_mode",
      "pool.suspended",
      "host.dstate",
      "host.dmesg",
      "host.memory",
      "host.swap",
      "host.iowait",
    ]);
    expect(r.checks.every((c) => c.status === "ok")).toBe(true);
  });

  test("a warning keeps it healthy; a block makes it unhealthy", async () => {
    poolOk();
    expect((await runHealthChecks({ pool: "p", io: hostIo({}, MEMINFO(80_000)) })).healthy).toBe(true);
    const r = await runHealthChecks({ pool: "p", io: hostIo({}, MEMINFO(10_000)) });
    expect(r.healthy).toBe(false);
    expect(byName(r.checks, "host.memory").status).toBe("block");
  });

  test("a check that hangs is cut off at its timeout and blocks", async () => {
    poolOk();
    const io = hostIo({ readKmsg: () => new Promise<string[]>(() => {}) });
    const t0 = performance.now();
    const r = await runHealthChecks({ pool: "p", io, timeoutMs: 150 });
    expect(performance.now() - t0).toBeLessThan(1000);
    const d = byName(r.checks, "host.dmesg");
    expect(d.status).toBe("block");
    expect(d.message).toBe("check did not finish within 150 ms");
    expect(r.healthy).toBe(false);
  });

  test("assertHealthy throws ThinimgError('unhealthy') with the reason and the runbook step", async () => {
    setRunner(async (argv) => cmdResult(argv, { stderr: "Device does not exist.\n", exitCode: 1 }));
    let err: unknown;
    await assertHealthy({ pool: "gone", io: hostIo() }).catch((e) => {
      err = e;
    });
    expect(err).toBeInstanceOf(ThinimgError);
    const e = err as ThinimgError;
    expect(e.kind).toBe("unhealthy");
    expect(e.exitCode).toBe(1);
    expect(e.message).toBe("health check pool.exists blocks dm work: pool gone not found (no such device-mapper device)");
    expect(e.hint).toContain("bun ops/recover-pool.ts");
  });

  test("host only: no pool checks", async () => {
    const r = await runHealthChecks({ io: hostIo() });
    expect(r.pool).toBeNull();
    expect(r.checks.some((c) => c.name.startsWith("pool."))).toBe(false);
  });
});

describe("scripts/health.ts arguments", () => {
  test("warn above block is a usage error (exit 2, one line)", () => {
    const p = Bun.spawnSync(["bun", "scripts/health.ts", "--data-warn", "99", "--data-block", "90"], { stderr: "pipe" });
    expect(p.exitCode).toBe(2);
    expect(p.stderr.toString().trim().split("\n")).toEqual(["error: --data-warn 99 is above --data-block 90 — see --help"]);
  });
  test("--ack acknowledges the recorded kernel errors, says so, and logs who and when", () => {
    const dir = mkdtempSync("/tmp/thinimg-health-unit-");
    try {
      const f = {
        boot_id: "b",
        seq: 7,
        what: "I/O error on a dm device",
        line: "Buffer I/O error on dev dm-2",
        logged_at: Date.now() - 60_000,
        first_seen_at: Date.now(),
        acknowledged: null,
      };
      writeFileSync(`${dir}/health-findings.json`, JSON.stringify({ findings: [f] }));
      const p = Bun.spawnSync(["bun", "scripts/health.ts", "--ack", "--host-only", "--state-dir", dir, "--json"], {
        stdout: "pipe",
        stderr: "pipe",
        env: { ...process.env, SUDO_USER: "dave" },
      });
      expect(p.stderr.toString()).toContain("acknowledged 1 kernel error(s) as dave (via sudo as");
      expect(JSON.parse(p.stdout.toString()).acknowledged).toEqual([{ boot_id: "b", seq: 7, what: f.what, line: f.line }]);
      const rec = JSON.parse(readFileSync(`${dir}/health-ack.log`, "utf8"));
      expect(rec.by).toContain("dave");
      expect(Math.abs(Date.parse(rec.at) - Date.now())).toBeLessThan(60_000);
      expect(JSON.parse(readFileSync(`${dir}/health-findings.json`, "utf8")).findings[0].acknowledged.by).toContain("dave");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a percentage must be a whole number 0..100", () => {
    const p = Bun.spawnSync(["bun", "scripts/health.ts", "--meta-block", "120"], { stderr: "pipe" });
    expect(p.exitCode).toBe(2);
    expect(p.stderr.toString()).toContain("--meta-block: 120 is above the maximum 100");
  });
});
