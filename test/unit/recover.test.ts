// recover-pool decisions with a fake command runner standing in for losetup/dmsetup/thin tools (the
// VM tests run the real ones). Files are real (a temp dir per test): records, backing files, sizes,
// the metadata superblock and the repair's link/rename are all checked on disk.
import { afterAll, afterEach, beforeEach, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type CmdResult, type RunOptions, setRunner, spawnRunner } from "../../lib/exec.ts";
import { grownRecord, growTargets, parseSizeArg } from "../../lib/recover/grow.ts";
import { LOCK_FILE, lockDir } from "../../lib/recover/lock.ts";
import { devString, toolReason } from "../../lib/recover/observe.ts";
import { newRecord, type PoolRecord, readRecord, writeRecord } from "../../lib/recover/record.ts";
import { type RecoverOptions, type RecoverReport, recoverPool } from "../../lib/recover/recover.ts";
import { renderReport } from "../../lib/recover/report.ts";
import { shellArg, shellLine } from "../../lib/recover/runbook.ts";
import { captureWarnings } from "../helpers/log.ts";
import { cmdResult } from "../helpers/run.ts";

const root = mkdtempSync("/tmp/thinimg-recover-unit-");
afterAll(() => rmSync(root, { recursive: true, force: true }));

const NOW = new Date("2025-01-02T03:04:05.678Z");
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const POOL_STATUS = "0 2097152 thin-pool 7 215/8192 16/16384 - rw no_discard_passdown error_if_no_space - 819";

interface Loop {
  device: string;
  file: string;
  ino: number;
  dev: string;
  ro: boolean;
}
interface DmDev {
  table: string;
  suspended: boolean;
  live: boolean;
  inactive: boolean;
  status: string;
}

/** A tiny model of the host: loop devices, dm devices, thin tool verdicts. Records every command. */
class FakeHost {
  loops: Loop[] = [];
  dm = new Map<string, DmDev>();
  calls: string[][] = [];
  /** thin_check verdicts by device or file path; default pass. */
  check = new Map<string, { ok: boolean; out: string }>();
  repairResults: { ok: boolean; out: string }[] = [];
  attachFails = false;
  noDriver = false;
  nextLoop = 0;

  attach(file: string, ro = false): string {
    const st = statSync(file, { bigint: true });
    const device = `/dev/loop${this.nextLoop++}`;
    this.loops.push({ device, file, ino: Number(st.ino), dev: devString(st.dev), ro });
    return device;
  }
  majMin(dev: string): string {
    return `7:${dev.replace("/dev/loop", "")}`;
  }
  /** A pool table the way the kernel prints it (devices as major:minor). */
  poolTable(meta: string, data: string, extra = "128 1638 1 error_if_no_space", len = 2097152): string {
    return `0 ${len} thin-pool ${this.majMin(meta)} ${this.majMin(data)} ${extra}`;
  }
  addPool(name: string, table: string, o: Partial<DmDev> = {}) {
    this.dm.set(name, { table, suspended: false, live: true, inactive: false, status: POOL_STATUS, ...o });
  }
  mutations(): string[] {
    return this.calls
      .filter(
        (a) =>
          (a[0] === "losetup" && !a.includes("--list")) ||
          (a[0] === "dmsetup" && /^(create|remove|resume|suspend|reload|message|clear)$/.test(a[1]!)) ||
          a[0] === "thin_repair" ||
          a[0] === "fallocate" ||
          a.includes("--clear-needs-check-flag"),
      )
      .map((a) => a.join(" "));
  }

  runner = async (argv: string[], _o?: RunOptions): Promise<CmdResult> => {
    const a = argv.filter((x) => x !== "--noudevsync");
    this.calls.push(a);
    const res = (exitCode: number, stdout = "", stderr = ""): CmdResult => cmdResult(argv, { stdout, stderr, exitCode });
    const [cmd, ...rest] = a;
    if (cmd === "losetup") {
      if (rest[0] === "--list") {
        return res(
          0,
          JSON.stringify({
            loopdevices: this.loops.map((l) => ({
              name: l.device,
              "back-file": l.file,
              ro: l.ro,
              "maj:min": `  ${this.majMin(l.device)}  `,
              "back-ino": l.ino,
              "back-maj:min": `   ${l.dev} `,
            })),
          }),
        );
      }
      if (rest[0] === "--find") {
        if (this.attachFails) return res(1, "", "losetup: cannot find an unused loop device");
        return res(0, `${this.attach(rest.at(-1)!)}\n`);
      }
      if (rest[0] === "--detach") {
        this.loops = this.loops.filter((l) => l.device !== rest[1]);
        return res(0);
      }
    }
    if (cmd === "dmsetup") {
      const name = rest.at(-1)!;
      const d = this.dm.get(name);
      switch (rest[0]) {
        case "version":
          return this.noDriver
            ? res(1, "Library version:   1.02.185\n", "/dev/mapper/control: open failed: No such device\nCommand failed.")
            : res(0, "Driver version:    4.47.0\n");
        case "info": {
          if (!d) return res(1, "", "Device does not exist.\nCommand failed.");
          const attr = `${d.live ? "L" : "-"}${d.inactive ? "I" : "-"}${d.suspended ? "s" : "-"}w`;
          return res(0, `${name}|${attr}|0|254|${[...this.dm.keys()].indexOf(name)}|0|1|\n`);
        }
        case "table":
          return d ? res(0, `${d.table}\n`) : res(1, "", "Device does not exist.");
        case "status":
          return d ? res(0, `${d.status}\n`) : res(1, "", "Device does not exist.");
        case "resume":
          if (d) d.suspended = false;
          return res(d ? 0 : 1);
        case "create": {
          const n = rest[1]!;
          if (this.dm.has(n)) return res(1, "", `device-mapper: create ioctl on ${n}  failed: Device or resource busy`);
          const t = rest[rest.indexOf("--table") + 1]!.replace(/\/dev\/loop(\d+)/g, "7:$1");
          this.addPool(n, t);
          return res(0);
        }
        case "ls": {
          const pools = [...this.dm.entries()].filter(([, v]) => v.table.includes(" thin-pool "));
          return res(0, pools.map(([k], i) => `${k}\t(254, ${i})`).join("\n") || "No devices found");
        }
      }
    }
    if (cmd === "thin_check") {
      const v = this.check.get(rest.at(-1)!) ?? { ok: true, out: "examining superblock\n" };
      return res(v.ok ? 0 : 1, "", v.out);
    }
    if (cmd === "thin_repair") {
      const v = this.repairResults.shift() ?? { ok: true, out: "" };
      return res(v.ok ? 0 : 1, "", v.out);
    }
    if (cmd === "fallocate") return res(1, "", "fallocate: fallocate failed: Operation not supported"); // hostfs-like
    throw new Error(`fake host: unexpected command ${argv.join(" ")}`);
  };
}

let host: FakeHost;
let n = 0;
beforeEach(() => {
  host = new FakeHost();
  setRunner(host.runner);
});
afterEach(() => setRunner(spawnRunner));

const probe = { which: (c: string) => `/usr/sbin/${c}`, now: () => NOW };
const run = (o: Partial<RecoverOptions> & { dir: string }) => recoverPool({ probe, ...o });
const freshDir = () => join(root, `d${++n}`);
const names = (r: RecoverReport) => r.steps.map((s) => `${s.name}:${s.status}`);

/** A pool directory as a completed --create leaves it (formatted metadata = non-zero superblock). */
function readyDir(o: { pool?: string; txid?: number } = {}): { dir: string; rec: PoolRecord; meta: string; data: string } {
  const dir = freshDir();
  mkdirSync(dir);
  const rec: PoolRecord = {
    ...newRecord(o.pool ?? "tp", { dataSize: GiB, metaSize: 32 * MiB, blockSize: 65536, features: ["error_if_no_space"] }, NOW),
    state: "ready",
    last_transaction_id: o.txid ?? 7,
  };
  writeRecord(dir, rec);
  const meta = join(dir, "metadata.img");
  const data = join(dir, "data.img");
  writeFileSync(meta, "");
  writeFileSync(data, "");
  Bun.spawnSync(["truncate", "-s", String(32 * MiB), meta]);
  Bun.spawnSync(["truncate", "-s", String(GiB), data]);
  const fd = Bun.file(meta).writer();
  fd.write("thin superblock");
  fd.end();
  return { dir, rec, meta, data };
}

describe("--create", () => {
  test("writes the record before any file or device exists, then files, loops, pool, record ready", async () => {
    const dir = freshDir();
    let recordBeforeFiles = false;
    const inner = host.runner;
    setRunner(async (argv, o) => {
      if (argv[0] === "fallocate" && argv.at(-1)!.endsWith("metadata.img")) recordBeforeFiles = readRecord(dir)?.state === "creating";
      return inner(argv, o);
    });
    const r = await run({ dir, pool: "tp", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r.error).toBeNull();
    expect(r).toMatchObject({ ok: true, action: "created", pool: "tp", exit_code: 0, devices: { metadata: "/dev/loop0", data: "/dev/loop1" } });
    expect(recordBeforeFiles).toBe(true);
    expect(names(r)).toEqual([
      "preflight:ok",
      "mkdir:done",
      "write-record:done",
      "create-file:done",
      "create-file:done",
      "check-files:ok",
      "attach-loop:done",
      "attach-loop:done",
      "check-metadata:skipped",
      "create-pool:done",
      "verify-status:ok",
      "write-record:done",
    ]);
    expect(host.dm.get("tp")!.table).toBe("0 2097152 thin-pool 7:0 7:1 128 1638 1 error_if_no_space");
    expect(statSync(join(dir, "metadata.img")).size).toBe(32 * MiB);
    expect(statSync(join(dir, "data.img")).size).toBe(GiB);
    expect(host.calls.some((c) => c[0] === "thin_check")).toBe(false); // blank metadata: the kernel formats it
    const rec = readRecord(dir)!;
    expect(rec).toMatchObject({
      pool: "tp",
      state: "ready",
      meta_size: 32 * MiB,
      data_size: GiB,
      block_size: 65536,
      block_sectors: 128,
      data_sectors: 2097152,
      low_water_mark: 1638,
      features: ["error_if_no_space"],
      last_transaction_id: 7,
    });
    expect(existsSync(join(dir, LOCK_FILE))).toBe(false);
  });

  test("a second --create is refused and touches nothing", async () => {
    const { dir, meta } = readyDir();
    const before = readFileSync(join(dir, "pool.json"), "utf8");
    const mtime = statSync(meta).mtimeMs;
    const r = await run({ dir, pool: "tp", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r).toMatchObject({ ok: false, action: "blocked", exit_code: 8 });
    expect(r.error!.message).toContain("already holds pool tp");
    expect(r.next_steps).toEqual([`bun ops/recover-pool.ts --dir ${dir}`]);
    expect(host.mutations()).toEqual([]);
    expect(readFileSync(join(dir, "pool.json"), "utf8")).toBe(before);
    expect(statSync(meta).mtimeMs).toBe(mtime);
  });

  test("filesystem errors (no such directory, no permission for the lock) are one-line reports, not crashes", async () => {
    const nodir = await run({ dir: "/proc/x-nope", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(nodir).toMatchObject({ ok: false, action: "blocked", exit_code: 7, error: { kind: "missing" } });
    expect(nodir.error!.message).toBe("mkdir /proc/x-nope: no such file or directory (ENOENT)");
    expect(nodir.error!.hint).toMatch(/check the path/);
    expect(names(nodir)).toEqual(["preflight:ok", "mkdir:failed"]);
    // /sys exists but takes no new files: the lock file cannot be made
    const nolock = await run({ dir: "/sys", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(nolock).toMatchObject({ ok: false, action: "blocked", error: { kind: "input" } });
    expect(nolock.error!.message).toMatch(/^open \/sys\/\.recover-pool\.lock: (permission denied \(EACCES\)|read-only file system \(EROFS\))$/);
    expect(host.mutations()).toEqual([]);
  });

  test("backing files without a record are never overwritten", async () => {
    const dir = freshDir();
    mkdirSync(dir);
    writeFileSync(join(dir, "data.img"), "precious");
    const r = await run({ dir, create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r.error!.message).toMatch(/data\.img already exists and .*pool\.json does not: refusing to overwrite/);
    expect(readFileSync(join(dir, "data.img"), "utf8")).toBe("precious");
    expect(existsSync(join(dir, "pool.json"))).toBe(false);
    expect(host.mutations()).toEqual([]);
  });

  test("refuses a pool name already in use by a dm device, before writing anything", async () => {
    host.addPool("tp", "0 8 linear 7:9 0");
    const dir = freshDir();
    const r = await run({ dir, pool: "tp", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r.error!.message).toBe("a device-mapper device named tp already exists");
    expect(existsSync(join(dir, "pool.json"))).toBe(false);
  });

  test("an interrupted create (record, empty metadata file, no data file) is finished by a re-run", async () => {
    const dir = freshDir();
    mkdirSync(dir);
    writeRecord(dir, newRecord("tp", { dataSize: GiB, metaSize: 32 * MiB, blockSize: 65536, features: ["error_if_no_space"] }, NOW));
    writeFileSync(join(dir, "metadata.img"), ""); // fallocate created it, then the crash
    const r = await run({ dir, pool: "tp", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r).toMatchObject({ ok: true, action: "created" });
    expect(names(r)).toContain("size-file:done");
    expect(statSync(join(dir, "metadata.img")).size).toBe(32 * MiB);
    expect(readRecord(dir)!.state).toBe("ready");
  });

  test("a plain recover also finishes an interrupted create; pool already loaded → just marked ready", async () => {
    const dir = freshDir();
    mkdirSync(dir);
    writeRecord(dir, newRecord("tp", { dataSize: GiB, metaSize: 32 * MiB, blockSize: 65536, features: ["error_if_no_space"] }, NOW));
    writeFileSync(join(dir, "metadata.img"), "");
    writeFileSync(join(dir, "data.img"), "");
    Bun.spawnSync(["truncate", "-s", String(32 * MiB), join(dir, "metadata.img")]);
    Bun.spawnSync(["truncate", "-s", String(GiB), join(dir, "data.img")]);
    const m = host.attach(join(dir, "metadata.img"));
    const d = host.attach(join(dir, "data.img"));
    host.addPool("tp", host.poolTable(m, d)); // crash came after dmsetup create, before the record flip
    const r = await run({ dir });
    expect(r).toMatchObject({ ok: true, action: "created" });
    expect(host.mutations()).toEqual([]);
    expect(readRecord(dir)!.state).toBe("ready");
  });

  test("an interrupted create with other parameters is not continued", async () => {
    const dir = freshDir();
    mkdirSync(dir);
    writeRecord(dir, newRecord("tp", { dataSize: 2 * GiB, metaSize: 32 * MiB, blockSize: 65536, features: ["error_if_no_space"] }, NOW));
    const r = await run({ dir, pool: "tp", create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r.error!.message).toContain("interrupted --create of pool tp (data 2.0 GiB");
    expect(host.mutations()).toEqual([]);
  });

  test("bad sizes are usage errors", async () => {
    const dir = freshDir();
    expect((await run({ dir, create: { dataSize: GiB, metaSize: MiB } })).error!.message).toMatch(/--meta-size 1\.0 MiB must be/);
    expect((await run({ dir, create: { dataSize: GiB, metaSize: 32 * MiB, blockSize: 4096 } })).error!.message).toMatch(
      /--block-size 4\.0 KiB must be a multiple of 64K/,
    );
    expect((await run({ dir, create: { dataSize: 1000, metaSize: 32 * MiB } })).exit_code).toBe(2);
    expect(existsSync(dir)).toBe(false);
  });

  test("dry run: creates nothing and prints a runnable plan", async () => {
    const dir = freshDir();
    const r = await run({ dir, pool: "tp", dryRun: true, create: { dataSize: GiB, metaSize: 32 * MiB } });
    expect(r).toMatchObject({ ok: true, action: "created", dry_run: true });
    expect(existsSync(dir)).toBe(false);
    expect(host.mutations()).toEqual([]);
    const out = renderReport(r).stdout;
    expect(out[0]).toBe(`# recover-pool --dry-run: pool tp in ${dir}: would be created`);
    expect(out).toContain(`mkdir -p ${dir}`);
    expect(out).toContain(`fallocate -l 33554432 ${dir}/metadata.img   # only if it says "Operation not supported": truncate -s 33554432 ${dir}/metadata.img`);
    expect(out).toContain(`META_DEV=$(losetup --find --show ${dir}/metadata.img)`);
    expect(out.some((l) => l.endsWith(`create tp --table "0 2097152 thin-pool $META_DEV $DATA_DEV 128 1638 1 error_if_no_space"`))).toBe(true);
  });
});

describe("recover", () => {
  test("healthy pool: report, change nothing (no command that changes state, record untouched)", async () => {
    const { dir, meta, data } = readyDir();
    const m = host.attach(meta);
    const d = host.attach(data);
    host.addPool("tp", host.poolTable(m, d));
    const rec = readFileSync(join(dir, "pool.json"), "utf8");
    const r = await run({ dir });
    expect(r).toMatchObject({ ok: true, action: "healthy", exit_code: 0, devices: { metadata: m, data: d } });
    expect(r.status).toMatchObject({ kind: "ok", mode: "rw", needs_check: false, transaction_id: 7, data_used: 16, data_total: 16384 });
    expect(host.mutations()).toEqual([]);
    expect(host.calls.some((c) => c[0] === "thin_check")).toBe(false); // never on live metadata
    expect(readFileSync(join(dir, "pool.json"), "utf8")).toBe(rec);
  });

  test("after a reboot: attach both files, thin_check (clearing needs_check), load the table, note the txid", async () => {
    const { dir, meta, data } = readyDir({ txid: 3 });
    host.loops.push({ device: "/dev/loop9", file: "/elsewhere/x.img", ino: 1, dev: "8:1", ro: false }); // unrelated
    host.nextLoop = 0;
    const r = await run({ dir });
    expect(r).toMatchObject({ ok: true, action: "recovered", devices: { metadata: "/dev/loop0", data: "/dev/loop1" } });
    expect(host.mutations()).toEqual([
      `losetup --find --show ${meta}`,
      `losetup --find --show ${data}`,
      "thin_check --clear-needs-check-flag /dev/loop0",
      "dmsetup create tp --table 0 2097152 thin-pool /dev/loop0 /dev/loop1 128 1638 1 error_if_no_space",
    ]);
    expect(readRecord(dir)!.last_transaction_id).toBe(7);
  });

  test("loops already attached (even twice) are reused, not attached again", async () => {
    const { dir, meta, data } = readyDir();
    const m = host.attach(meta);
    host.attach(meta);
    const d = host.attach(data);
    const r = await run({ dir });
    expect(r.ok).toBe(true);
    expect(r.steps.find((s) => s.name === "reuse-loop")!.detail).toBe(`metadata file already attached on ${m} (also attached on /dev/loop1; left alone)`);
    expect(host.mutations()).toEqual([
      `thin_check --clear-needs-check-flag ${m}`,
      `dmsetup create tp --table 0 2097152 thin-pool ${m} ${d} 128 1638 1 error_if_no_space`,
    ]);
  });

  test("a loop on a renamed-away file (same path, other inode) is not reused", async () => {
    const { dir, meta } = readyDir();
    host.loops.push({ device: "/dev/loop5", file: meta, ino: 424242, dev: "0:99", ro: false });
    host.nextLoop = 0;
    const r = await run({ dir, dryRun: true });
    expect(renderReport(r).stdout).toContain(`META_DEV=$(losetup --find --show ${meta})`);
    expect(r.steps.some((s) => s.detail?.includes("/dev/loop5"))).toBe(false);
  });

  test("suspended pool is resumed (never left suspended)", async () => {
    const { dir, meta, data } = readyDir();
    host.addPool("tp", host.poolTable(host.attach(meta), host.attach(data)), { suspended: true });
    const r = await run({ dir });
    expect(r).toMatchObject({ ok: true, action: "recovered" });
    expect(host.mutations()).toEqual(["dmsetup resume tp"]);
    expect(host.dm.get("tp")!.suspended).toBe(false);
  });

  test("pool active with a different table (other loops): stop, explain, change nothing", async () => {
    const { dir, meta, data } = readyDir();
    host.attach(meta);
    host.attach(data);
    const other = mkdtempSync(join(root, "other-"));
    writeFileSync(join(other, "m"), "x");
    writeFileSync(join(other, "d"), "x");
    const om = host.attach(join(other, "m"));
    const od = host.attach(join(other, "d"));
    host.addPool("tp", host.poolTable(om, od));
    const r = await run({ dir });
    expect(r).toMatchObject({ ok: false, action: "blocked", exit_code: 8 });
    expect(r.error!.message).toContain(`pool tp is active with a different table: metadata device is 7:2 (/dev/loop2 → ${other}/m), not a loop of ${meta}`);
    expect(r.error!.hint).toContain("never reloads a live pool");
    expect(r.next_steps).toContain("dmsetup table tp");
    expect(host.mutations()).toEqual([]);
  });

  test("same loops but other parameters is a different table too", async () => {
    const { dir, meta, data } = readyDir();
    host.addPool("tp", host.poolTable(host.attach(meta), host.attach(data), "128 1638 0"));
    const r = await run({ dir });
    expect(r.error!.message).toContain("features [], recorded [error_if_no_space]");
    expect(host.mutations()).toEqual([]);
  });

  test("an inactive table waiting for resume blocks (a resume would swap it in)", async () => {
    const { dir, meta, data } = readyDir();
    host.addPool("tp", host.poolTable(host.attach(meta), host.attach(data)), { suspended: true, inactive: true });
    const r = await run({ dir });
    expect(r.error!.message).toContain("inactive table loaded");
    expect(host.mutations()).toEqual([]);
  });

  test("files in use by a pool under another name: refuse to load them twice", async () => {
    const { dir, meta, data } = readyDir();
    host.addPool("other", host.poolTable(host.attach(meta), host.attach(data)));
    const r = await run({ dir });
    expect(r.error!.message).toBe(`${meta} is in use by the active pool other (the record names tp)`);
    expect(host.mutations()).toEqual([]);
  });

  test("pool status Fail / needs_check / out of space / ro: blocked, nothing removed", async () => {
    for (const [status, re] of [
      ["0 2097152 thin-pool Fail", /Fail mode/],
      ["0 2097152 thin-pool 7 215/8192 16/16384 - ro no_discard_passdown error_if_no_space needs_check 819", /needs_check set/],
      ["0 2097152 thin-pool 7 215/8192 16384/16384 - out_of_data_space no_discard_passdown error_if_no_space - 819", /out of data space/],
      ["0 2097152 thin-pool 7 215/8192 16/16384 - ro no_discard_passdown error_if_no_space - 819", /read-only/],
    ] as const) {
      host = new FakeHost();
      setRunner(host.runner);
      const { dir, meta, data } = readyDir();
      host.addPool("tp", host.poolTable(host.attach(meta), host.attach(data)), { status });
      const r = await run({ dir });
      expect(r.action).toBe("blocked");
      expect(r.exit_code).toBe(1);
      expect(r.error!.message).toMatch(re);
      expect(host.mutations()).toEqual([]);
    }
  });

  test("thin_check fails: stop before loading, print the exact repair commands", async () => {
    const { dir, meta } = readyDir({ txid: 12 });
    host.check.set("/dev/loop0", {
      ok: false,
      out: "examining superblock\n  superblock is corrupt\n    bad checksum in superblock, wanted 1234\nmetadata has not been fully examined",
    });
    const r = await run({ dir });
    expect(r).toMatchObject({ ok: false, action: "blocked", exit_code: 1 });
    expect(r.error!.message).toBe("metadata of pool tp is damaged: thin_check failed on /dev/loop0: superblock is corrupt");
    expect(host.mutations().some((m) => m.startsWith("dmsetup create"))).toBe(false);
    expect(r.next_steps).toEqual([
      `rm -f ${meta}.repair`,
      `fallocate -l 33554432 ${meta}.repair   # only if it says "Operation not supported": truncate -s 33554432 ${meta}.repair`,
      `REPAIR_DEV=$(losetup --find --show ${meta}.repair)`,
      `thin_repair -i /dev/loop0 -o "$REPAIR_DEV" || thin_repair -i /dev/loop0 -o "$REPAIR_DEV" --transaction-id 12 --data-block-size 128 --nr-data-blocks 16384`,
      `thin_check "$REPAIR_DEV"`,
      `losetup --detach "$REPAIR_DEV"`,
      "losetup --detach /dev/loop0",
      `ln ${meta} ${meta}.broken-20250102T030405Z`,
      `mv -T ${meta}.repair ${meta}`,
      `bun ops/recover-pool.ts --dir ${dir}`,
    ]);
    const text = renderReport(r).stderr.join("\n");
    expect(text).toContain("error: metadata of pool tp is damaged");
    expect(text).toContain("next steps:\n  rm -f");
  });

  test("--repair performs the steps: new file, thin_repair (retry with recorded superblock fields), swap, old kept", async () => {
    const { dir, meta, data } = readyDir({ txid: 12 });
    const oldIno = statSync(meta).ino;
    host.check.set("/dev/loop0", { ok: false, out: "bad checksum in superblock" });
    host.repairResults = [
      { ok: false, out: "The following field needs to be provided on the command line due to corruption in the superblock: transaction id" },
    ];
    const r = await run({ dir, repair: true });
    expect(r.error).toBeNull();
    expect(r).toMatchObject({ ok: true, action: "recovered", devices: { metadata: "/dev/loop3" } });
    expect(host.mutations()).toEqual([
      `losetup --find --show ${meta}`,
      `losetup --find --show ${data}`,
      "thin_check --clear-needs-check-flag /dev/loop0",
      `fallocate -l 33554432 ${meta}.repair`,
      `losetup --find --show ${meta}.repair`,
      "thin_repair -i /dev/loop0 -o /dev/loop2",
      "thin_repair -i /dev/loop0 -o /dev/loop2 --transaction-id 12 --data-block-size 128 --nr-data-blocks 16384",
      "losetup --detach /dev/loop2",
      "losetup --detach /dev/loop0",
      `losetup --find --show ${meta}`,
      "thin_check --clear-needs-check-flag /dev/loop3",
      "dmsetup create tp --table 0 2097152 thin-pool /dev/loop3 /dev/loop1 128 1638 1 error_if_no_space",
    ]);
    expect(host.calls.some((c) => c.join(" ") === "thin_check /dev/loop2")).toBe(true);
    const kept = join(dir, "metadata.img.broken-20250102T030405Z");
    expect(statSync(kept).ino).toBe(oldIno);
    expect(statSync(meta).ino).not.toBe(oldIno);
    expect(existsSync(`${meta}.repair`)).toBe(false);
    expect(readRecord(dir)!.repairs).toEqual([{ at: NOW.toISOString(), kept: "metadata.img.broken-20250102T030405Z", transaction_id: 12 }]);
    expect(r.steps.find((s) => s.name === "thin-repair")!.detail).toContain("came from the record (transaction id 12)");
  });

  test("--repair when thin_repair cannot: blocked, damaged metadata untouched, pool not loaded", async () => {
    const { dir, meta } = readyDir();
    const ino = statSync(meta).ino;
    host.check.set("/dev/loop0", { ok: false, out: "bad checksum in superblock" });
    host.repairResults = [{ ok: false, out: "no compatible roots found" }];
    const r = await run({ dir, repair: true });
    expect(r.error!.message).toBe("thin_repair could not rebuild the metadata of pool tp: no compatible roots found");
    expect(statSync(meta).ino).toBe(ino);
    expect(host.dm.has("tp")).toBe(false);
  });

  test("a wiped (all-zero) superblock on a pool that was in use is never loaded (it would be formatted)", async () => {
    const { dir, meta } = readyDir();
    const fd = Bun.file(meta).writer();
    fd.write(new Uint8Array(4096));
    fd.end();
    host.check.set("/dev/loop0", { ok: false, out: "bad checksum in superblock" });
    const r = await run({ dir });
    expect(r.error!.message).toContain("all zeros (wiped)");
    expect(host.dm.has("tp")).toBe(false);
  });

  test("dry run after a reboot: reads only, thin_check without writing, prints the plan", async () => {
    const { dir, meta, data } = readyDir();
    const r = await run({ dir, dryRun: true });
    expect(r).toMatchObject({ ok: true, action: "recovered", dry_run: true });
    expect(host.mutations()).toEqual([]);
    expect(host.calls.find((c) => c[0] === "thin_check")).toEqual(["thin_check", meta]);
    expect(renderReport(r).stdout).toEqual([
      `# recover-pool --dry-run: pool tp in ${dir}: would be recovered`,
      `META_DEV=$(losetup --find --show ${meta})`,
      `DATA_DEV=$(losetup --find --show ${data})`,
      `DM_DISABLE_UDEV=1 dmsetup --noudevsync create tp --table "0 2097152 thin-pool $META_DEV $DATA_DEV 128 1638 1 error_if_no_space"`,
      "dmsetup status tp",
      `# note the transaction id in ${dir}/pool.json`,
    ]);
    expect(existsSync(join(dir, LOCK_FILE))).toBe(false);
  });

  test("missing pieces each get one clear line", async () => {
    const dir = freshDir();
    let r = await run({ dir });
    expect([r.error!.message, r.exit_code]).toEqual([`pool directory ${dir} does not exist`, 7]);
    mkdirSync(dir);
    r = await run({ dir });
    expect(r.error!.message).toBe(`no pool record ${dir}/pool.json (no backing files exist there either)`);
    expect(r.error!.hint).toContain("--create");
    writeFileSync(join(dir, "metadata.img"), "x");
    writeFileSync(join(dir, "data.img"), "x");
    r = await run({ dir });
    expect(r.error!.message).toBe(`no pool record ${dir}/pool.json (metadata.img and data.img exist there)`);
    expect(r.error!.hint).toContain("restore pool.json");

    const ready = readyDir();
    rmSync(ready.data);
    r = await run({ dir: ready.dir });
    expect(r.error!.message).toBe(`data backing file ${ready.data} is missing (pool tp)`);

    const r2 = readyDir();
    r = await run({ dir: r2.dir, pool: "other" });
    expect(r.error!.message).toBe(`${r2.dir}/pool.json is for pool tp, not other`);

    writeFileSync(join(r2.dir, "pool.json"), "{ not json");
    r = await run({ dir: r2.dir });
    expect(r.error!.message).toMatch(/pool\.json is not valid JSON/);

    const r3 = readyDir();
    host.attachFails = true;
    r = await run({ dir: r3.dir });
    expect(r.error!.message).toBe(
      `could not attach a loop device to ${r3.meta}: losetup --find --show ${r3.meta}: exit 1: losetup: cannot find an unused loop device`,
    );

    r = await recoverPool({ dir: r3.dir, probe: { ...probe, which: (c) => (c === "dmsetup" ? null : c) } });
    expect([r.error!.message, r.error!.hint]).toEqual([
      "dmsetup is not installed (not on PATH)",
      "install it: apt-get install -y dmsetup (or bash scripts/setup.sh)",
    ]);
    r = await recoverPool({ dir: r3.dir, repair: true, probe: { ...probe, which: (c) => (c === "thin_repair" ? null : c) } });
    expect(r.error!.message).toBe("thin_repair is not installed (not on PATH)");
    host.noDriver = true;
    r = await run({ dir: r3.dir });
    expect(r.error!.message).toBe("device-mapper is not available in this kernel (dmsetup version: /dev/mapper/control: open failed: No such device)");
  });

  test("a size that differs from the record blocks (no resizing, no truncation)", async () => {
    const { dir, data } = readyDir();
    Bun.spawnSync(["truncate", "-s", String(2 * GiB), data]);
    const r = await run({ dir });
    expect(r.error!.message).toBe(`data backing file ${data} is ${2 * GiB} bytes; the record says ${GiB}`);
    expect(statSync(data).size).toBe(2 * GiB);
  });
});

describe("pieces", () => {
  test("shell lines parse back to the same argv; placeholders stay expandable", () => {
    const argv = ["dmsetup", "create", "p", "--table", "0 8 thin-pool /dev/loop0 /dev/loop1 128 1 1 error_if_no_space", "it's", "", "a$b"];
    const line = shellLine(["printf", "%s\\n", ...argv]);
    const out = Bun.spawnSync(["sh", "-c", line]).stdout.toString();
    expect(out).toBe(`${argv.join("\n")}\n`);
    expect(shellArg("$META_DEV")).toBe('"$META_DEV"');
    expect(shellArg("0 8 thin-pool $META_DEV /dev/loop1")).toBe('"0 8 thin-pool $META_DEV /dev/loop1"');
    expect(shellLine(["losetup", "--find", "--show", "/a b"], "X")).toBe("X=$(losetup --find --show '/a b')");
    const expanded = Bun.spawnSync(["sh", "-c", `META_DEV=/dev/loop7; ${shellLine(["printf", "%s", "0 8 thin-pool $META_DEV x"])}`]).stdout.toString();
    expect(expanded).toBe("0 8 thin-pool /dev/loop7 x");
  });

  test("tool output: the line that says what is wrong", () => {
    expect(toolReason("examining superblock\n  superblock is corrupt\n    bad checksum in superblock\nmetadata has not been fully examined")).toBe(
      "superblock is corrupt",
    );
    expect(toolReason("just one line")).toBe("just one line");
  });

  test("record: written atomically, validated on read", () => {
    const dir = freshDir();
    mkdirSync(dir);
    const rec = newRecord("p1", { dataSize: GiB, metaSize: 32 * MiB, blockSize: 1024 * 1024, features: ["error_if_no_space"] }, NOW);
    writeRecord(dir, rec);
    expect(readRecord(dir)).toEqual(rec);
    expect(rec).toMatchObject({ block_sectors: 2048, data_sectors: 2097152, low_water_mark: 102 });
    const j = JSON.parse(readFileSync(join(dir, "pool.json"), "utf8"));
    writeFileSync(join(dir, "pool.json"), JSON.stringify({ ...j, meta_file: "../etc/x" }));
    expect(() => readRecord(dir)).toThrow(/meta_file: must be a plain file name/);
    writeFileSync(join(dir, "pool.json"), JSON.stringify({ ...j, block_sectors: 128 }));
    expect(() => readRecord(dir)).toThrow(/inconsistent/);
    expect(() => writeRecord(dir, { ...rec, pool: "bad name" })).toThrow();
    expect(readdirNames(dir)).toEqual(["pool.json"]);
  });

  test("dir lock: held (even by this process) → refused with the holder; a file its dead holder left → taken over", () => {
    const dir = freshDir();
    mkdirSync(dir);
    const l = lockDir(dir, "recover-pool");
    expect(() => lockDir(dir, "recover-pool")).toThrow(/another recover-pool \(pid \d+, recover-pool, since/);
    l.release();
    expect(existsSync(join(dir, LOCK_FILE))).toBe(false);
    // a holder killed (or a host rebooted) mid-run leaves its record but no flock
    const child = Bun.spawnSync(["true"]);
    writeFileSync(join(dir, LOCK_FILE), JSON.stringify({ pid: child.pid, start_time: 1, acquired_at: "x", command: "c" }));
    const w = captureWarnings();
    const again = lockDir(dir, "recover-pool");
    w.stop();
    expect(w.lines.join("\n")).toContain(`taking over stale lock ${join(dir, LOCK_FILE)}: pid ${child.pid} (c, since x) is gone`);
    again.release();
    expect(existsSync(join(dir, LOCK_FILE))).toBe(false);
  });
});

function readdirNames(dir: string): string[] {
  return readdirSync(dir).sort();
}

describe("grow targets", () => {
  const rec: PoolRecord = { ...newRecord("tp", { dataSize: GiB, metaSize: 32 * MiB, blockSize: 65536, features: ["error_if_no_space"] }, NOW), state: "ready" };

  test("SIZE is the new size, +SIZE is that much more; the other part keeps its size", () => {
    expect(parseSizeArg("+512M", "--grow-data")).toEqual({ bytes: 512 * MiB, relative: true });
    expect(parseSizeArg("2G", "--grow-data")).toEqual({ bytes: 2 * GiB, relative: false });
    expect(growTargets(rec, { data: parseSizeArg("+512M", "--grow-data") })).toEqual({ dataSize: GiB + 512 * MiB, metaSize: 32 * MiB });
    expect(growTargets(rec, { data: parseSizeArg("2G", "x"), meta: parseSizeArg("+32M", "y") })).toEqual({ dataSize: 2 * GiB, metaSize: 64 * MiB });
  });

  test("never shrinks; metadata is a multiple of 4K and at most 16G: one-line usage errors", () => {
    expect(() => growTargets(rec, { data: parseSizeArg("512M", "--grow-data") })).toThrow(
      "--grow-data 512 MiB is smaller than the pool's data size 1.0 GiB: a pool never shrinks",
    );
    expect(() => growTargets(rec, { meta: parseSizeArg("16M", "--grow-meta") })).toThrow("a pool never shrinks");
    expect(() => growTargets(rec, { meta: parseSizeArg("17G", "--grow-meta") })).toThrow("at most 16G");
    expect(() => growTargets(rec, { meta: { bytes: 32 * MiB + 512, relative: false } })).toThrow("multiple of 4K");
    try {
      growTargets(rec, { data: parseSizeArg("1M", "--grow-data") });
    } catch (e) {
      expect((e as { kind: string }).kind).toBe("usage");
    }
  });

  test("a pending grow is finished first: the same target continues, another is refused", () => {
    const pending = { ...rec, grow: { data_size: 2 * GiB, meta_size: 32 * MiB, started_at: NOW.toISOString() } };
    expect(growTargets(pending, undefined)).toEqual({ dataSize: 2 * GiB, metaSize: 32 * MiB });
    // "+1G" against the record (not yet updated) is the same target: a re-run of the same command continues
    expect(growTargets(pending, { data: parseSizeArg("+1G", "--grow-data") })).toEqual({ dataSize: 2 * GiB, metaSize: 32 * MiB });
    expect(() => growTargets(pending, { data: parseSizeArg("3G", "--grow-data") })).toThrow("an interrupted grow of pool tp");
  });

  test("the grown record: sizes, data length in whole blocks (a partial block is not used), low water mark for the new size, nothing pending", () => {
    const g = grownRecord(
      { ...rec, grow: { data_size: 2 * GiB, meta_size: 64 * MiB, started_at: "x" } },
      { dataSize: 2 * GiB + 1000 * 512, metaSize: 64 * MiB },
      new Date("2026-01-01T00:00:00Z"),
    );
    expect(g).toMatchObject({
      data_size: 2 * GiB + 1000 * 512,
      meta_size: 64 * MiB,
      data_sectors: 32775 * 128,
      low_water_mark: 3277,
      grow: null,
      updated_at: "2026-01-01T00:00:00.000Z",
    });
    // it is a valid record (the schema accepts it and the pending field)
    const dir = mkdtempSync(join(root, "grow-"));
    writeRecord(dir, { ...rec, grow: { data_size: 2 * GiB, meta_size: 32 * MiB, started_at: NOW.toISOString() } });
    expect(readRecord(dir)?.grow?.data_size).toBe(2 * GiB);
    writeRecord(dir, g);
    expect(readRecord(dir)?.grow).toBeNull();
  });

  test("recover-pool rejects --grow-* with --create or --repair (exit 2)", () => {
    const p = Bun.spawnSync(["bun", "ops/recover-pool.ts", "--dir", root, "--repair", "--grow-data", "+1G"], { stderr: "pipe" });
    expect(p.exitCode).toBe(2);
    expect(p.stderr.toString()).toContain("--grow-data/--grow-meta cannot be combined with --repair");
  });
});
