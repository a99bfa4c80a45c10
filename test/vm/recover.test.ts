// recover-pool against the real dm-thin kernel in the VM, driven through its CLI exactly as an
// operator runs it: create, refuse to re-create, leave a healthy pool alone, bring a pool back after
// a simulated reboot with its thin data intact, resume a suspended pool, refuse a pool whose live
// table differs, and stop on (then repair) corrupt metadata.
// vm-seconds: 30 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import {
  closeSync,
  copyFileSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { dmsetup, losetup, parsePoolStatus, pool } from "../../lib/dm/index.ts";
import { setLogLevel } from "../../lib/log.ts";
import type { RecoverReport } from "../../lib/recover/recover.ts";
import { requireDm } from "../helpers/kernel.ts";
import { run } from "../helpers/run.ts";

requireDm();
setDefaultTimeout(180_000); // each step spawns the CLI (a bun start in UML: slow on a busy host)
setLogLevel("error"); // the expected "no such device" probes are not worth a warning line each

const base = mkdtempSync("/tmp/thinimg-recover-vm-");
const dir = join(base, "p");
const POOL = `rp${process.pid}`;
const THIN = `${POOL}-t1`;
const THIN_ID = 1;
const THIN_SIZE = 64 * 1024 * 1024;
const OFFSET = 5 * 1024 * 1024;
const pattern = crypto.getRandomValues(new Uint8Array(1024 * 1024));

async function recover(...args: string[]): Promise<{ code: number; report: RecoverReport; stderr: string }> {
  const { out, err, code } = await run(["bun", "ops/recover-pool.ts", ...args, "--json"]);
  let report: RecoverReport;
  try {
    report = JSON.parse(out) as RecoverReport;
  } catch {
    throw new Error(`recover-pool ${args.join(" ")} printed no JSON (exit ${code}):\n${out}\n${err}`);
  }
  return { code, report, stderr: err };
}

/** Everything a "changes nothing" claim is checked against: dm tables, info (incl. event counters), loops. */
async function snapshot(): Promise<string> {
  const devs = (await dmsetup.infoAll()).sort((a, b) => a.name.localeCompare(b.name));
  const tables = await Promise.all(devs.map(async (d) => `${d.name}: ${await dmsetup.table(d.name)}`));
  const loops = (await losetup.listDetailed()).map((l) => `${l.device} ${l.backingFile} ${l.backingInode} ${l.readOnly}`).sort();
  return JSON.stringify({ devs, tables, loops }, null, 1);
}

function writeAt(dev: string, data: Uint8Array, offset: number): void {
  const fd = openSync(dev, "r+");
  try {
    writeSync(fd, data, 0, data.length, offset);
    fsyncSync(fd); // a flush makes the pool commit its metadata
  } finally {
    closeSync(fd);
  }
}

function readAt(dev: string, length: number, offset: number): Uint8Array {
  const buf = new Uint8Array(length);
  const fd = openSync(dev, "r");
  try {
    expect(readSync(fd, buf, 0, length, offset)).toBe(length);
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** Power-cut without the power cut: every thin device and the pool removed, loops detached, files kept. */
async function simulateReboot(): Promise<void> {
  if (await dmsetup.exists(THIN)) await dmsetup.remove(THIN);
  if (await dmsetup.exists(POOL)) await dmsetup.remove(POOL);
  for (const l of await losetup.listDetailed()) if (l.backingFile.startsWith(`${dir}/`)) await losetup.detach(l.device);
  expect(await dmsetup.exists(POOL)).toBe(false);
  expect((await losetup.listDetailed()).filter((l) => l.backingFile.startsWith(dir))).toEqual([]);
}

async function statusOf(name: string) {
  const s = parsePoolStatus(await dmsetup.status(name));
  if (s.kind !== "ok") throw new Error(`pool ${name} status ${s.kind}`);
  return s;
}

afterAll(async () => {
  for (const n of [THIN, POOL]) if (await dmsetup.exists(n)) await dmsetup.remove(n).catch(() => {});
  for (const l of await losetup.listDetailed()) if (l.backingFile.startsWith(base)) await losetup.detach(l.device).catch(() => {});
  rmSync(base, { recursive: true, force: true });
});

describe("recover-pool on the real kernel", () => {
  test("--create: pool rw with error_if_no_space, record ready beside the files", async () => {
    const { code, report } = await recover("--create", "--dir", dir, "--data-size", "256M", "--meta-size", "8M", "--pool", POOL);
    expect(report.error).toBeNull();
    expect(code).toBe(0);
    expect(report).toMatchObject({ ok: true, action: "created", pool: POOL });
    const s = await statusOf(POOL);
    expect(s.mode).toBe("rw");
    expect(s.needsCheck).toBe(false);
    expect(s.noSpace).toBe("error_if_no_space");
    expect(s.dataTotal).toBe(4096);
    const rec = JSON.parse(readFileSync(join(dir, "pool.json"), "utf8"));
    expect(rec).toMatchObject({
      pool: POOL,
      state: "ready",
      data_size: 256 * 1024 ** 2,
      meta_size: 8 * 1024 ** 2,
      block_size: 65536,
      features: ["error_if_no_space"],
      last_transaction_id: 0,
    });
    expect(statSync(join(dir, "data.img")).size).toBe(256 * 1024 ** 2);
    const t = pool.parsePoolTable(await dmsetup.table(POOL));
    expect(t).toMatchObject({ dataSectors: 524288, blockSectors: 128, lowWaterMark: 409, features: ["error_if_no_space"] });
  });

  test("--create again is refused; files, record and dm state untouched", async () => {
    const files = () =>
      readdirSync(dir)
        .sort()
        .map((f) => {
          const st = statSync(join(dir, f));
          return `${f} ${st.ino} ${st.size} ${st.mtimeMs}`;
        });
    const before = { files: files(), record: readFileSync(join(dir, "pool.json"), "utf8"), dm: await snapshot() };
    const { code, report } = await recover("--create", "--dir", dir, "--data-size", "256M", "--meta-size", "8M", "--pool", POOL);
    expect(code).toBe(8);
    expect(report.action).toBe("blocked");
    expect(report.error!.message).toContain(`already holds pool ${POOL}`);
    expect({ files: files(), record: readFileSync(join(dir, "pool.json"), "utf8"), dm: await snapshot() }).toEqual(before);
  });

  test("recover on a healthy pool changes nothing (dm tables, info, loops, record)", async () => {
    await pool.createThin(POOL, THIN_ID);
    await pool.setTransactionId(POOL, 0, 1);
    await pool.activateThin(POOL, THIN, THIN_ID, THIN_SIZE);
    writeAt(`/dev/mapper/${THIN}`, pattern, OFFSET);
    const before = await snapshot();
    const record = readFileSync(join(dir, "pool.json"), "utf8");
    const { code, report } = await recover("--dir", dir);
    expect(code).toBe(0);
    expect(report).toMatchObject({ ok: true, action: "healthy" });
    expect(report.status).toMatchObject({ kind: "ok", mode: "rw", transaction_id: 1 });
    expect(report.steps.every((s) => s.status === "ok")).toBe(true);
    expect(await snapshot()).toBe(before);
    expect(readFileSync(join(dir, "pool.json"), "utf8")).toBe(record);
  });

  test("after a reboot: the pool comes back and the thin device reads the same bytes", async () => {
    const tid = (await statusOf(POOL)).transactionId;
    await dmsetup.remove(THIN);
    await simulateReboot();
    // dry run first: shows the plan, changes nothing
    const dm0 = await snapshot();
    const dry = await recover("--dir", dir, "--dry-run");
    expect(dry.code).toBe(0);
    expect(dry.report).toMatchObject({ ok: true, action: "recovered", dry_run: true });
    expect(dry.report.steps.filter((s) => s.status === "planned").map((s) => s.name)).toEqual([
      "attach-loop",
      "attach-loop",
      "check-metadata",
      "create-pool",
      "verify-status",
      "write-record",
    ]);
    expect(await snapshot()).toBe(dm0);

    const { code, report } = await recover("--dir", dir);
    expect(report.error).toBeNull();
    expect(code).toBe(0);
    expect(report.action).toBe("recovered");
    expect(report.steps.map((s) => `${s.name}:${s.status}`)).toContain("check-metadata:ok");
    const s = await statusOf(POOL);
    expect([s.mode, s.needsCheck, s.transactionId]).toEqual(["rw", false, tid]);
    await pool.activateThin(POOL, THIN, THIN_ID, THIN_SIZE);
    expect(Buffer.from(readAt(`/dev/mapper/${THIN}`, pattern.length, OFFSET)).equals(Buffer.from(pattern))).toBe(true);
    // and the loops it attached are the files' own
    const loops = await losetup.listDetailed();
    expect(loops.find((l) => l.device === report.devices.metadata)?.backingFile).toBe(join(dir, "metadata.img"));
    expect(loops.find((l) => l.device === report.devices.data)?.backingFile).toBe(join(dir, "data.img"));
  });

  test("a pool left suspended is resumed", async () => {
    await dmsetup.remove(THIN);
    await dmsetup.suspend(POOL);
    expect((await dmsetup.info(POOL))?.state).toBe("SUSPENDED");
    const { code, report } = await recover("--dir", dir);
    expect(code).toBe(0);
    expect(report.action).toBe("recovered");
    expect(report.steps.find((s) => s.name === "resume-pool")?.status).toBe("done");
    expect((await dmsetup.info(POOL))?.state).toBe("ACTIVE");
  });

  test("a record whose files are not what the live pool uses: stop, explain, touch nothing", async () => {
    const other = join(base, "other");
    mkdirSync(other);
    copyFileSync(join(dir, "pool.json"), join(other, "pool.json"));
    for (const [f, size] of [
      ["metadata.img", 8 * 1024 ** 2],
      ["data.img", 256 * 1024 ** 2],
    ] as const) {
      writeFileSync(join(other, f), "");
      Bun.spawnSync(["truncate", "-s", String(size), join(other, f)]);
    }
    const before = await snapshot();
    const { code, report } = await recover("--dir", other);
    expect(code).toBe(8);
    expect(report.error!.message).toContain(`pool ${POOL} is active with a different table: metadata device is 7:`);
    expect(report.error!.message).toContain(`not a loop of ${other}/metadata.img`);
    expect(await snapshot()).toBe(before);
  });

  test("corrupt metadata: thin_check fails → stops with the repair steps; --repair performs them; data intact", async () => {
    const tid = (await statusOf(POOL)).transactionId;
    await simulateReboot();
    const meta = join(dir, "metadata.img");
    const fd = openSync(meta, "r+");
    writeSync(fd, crypto.getRandomValues(new Uint8Array(4096)), 0, 4096, 0); // the superblock
    closeSync(fd);

    const blocked = await recover("--dir", dir);
    expect(blocked.code).toBe(1);
    expect(blocked.report.action).toBe("blocked");
    expect(blocked.report.error!.message).toMatch(/metadata of pool .* is damaged: thin_check failed on \/dev\/loop\d+: .*superblock/);
    expect(blocked.report.next_steps.some((c) => c.startsWith("thin_repair -i /dev/loop"))).toBe(true);
    expect(blocked.report.next_steps.at(-2)).toBe(`mv -T ${meta}.repair ${meta}`);
    expect(await dmsetup.exists(POOL)).toBe(false); // never loaded on bad metadata

    const inoBefore = statSync(meta).ino;
    const fixed = await recover("--dir", dir, "--repair");
    expect(fixed.report.error).toBeNull();
    expect(fixed.code).toBe(0);
    expect(fixed.report.action).toBe("recovered");
    // the superblock was destroyed: thin_repair needed the recorded fields, incl. the transaction id
    expect(fixed.report.steps.find((s) => s.name === "thin-repair")?.detail).toContain(`transaction id ${tid}`);
    const s = await statusOf(POOL);
    expect([s.mode, s.needsCheck, s.transactionId]).toEqual(["rw", false, tid]);
    const kept = readdirSync(dir).filter((f) => f.startsWith("metadata.img.broken-"));
    expect(kept.length).toBe(1);
    expect(statSync(join(dir, kept[0]!)).ino).toBe(inoBefore);
    expect(existsSync(`${meta}.repair`)).toBe(false);
    expect(JSON.parse(readFileSync(join(dir, "pool.json"), "utf8")).repairs).toHaveLength(1);
    await pool.activateThin(POOL, THIN, THIN_ID, THIN_SIZE);
    expect(Buffer.from(readAt(`/dev/mapper/${THIN}`, pattern.length, OFFSET)).equals(Buffer.from(pattern))).toBe(true);
    // a re-run now finds it healthy
    await dmsetup.remove(THIN);
    expect((await recover("--dir", dir)).report.action).toBe("healthy");
  }, 300_000);
});

describe("--create on a filesystem without the room", () => {
  const small = join(base, "small");
  const FULL_POOL = `${POOL}f`;
  afterAll(() => {
    Bun.spawnSync(["umount", small]);
  });

  test("tmpfs of 16 MiB: --create of 64M+4M is refused up front, one line, JSON report, nothing written", async () => {
    mkdirSync(small, { recursive: true });
    expect(Bun.spawnSync(["mount", "-t", "tmpfs", "-o", "size=16M", "none", small]).exitCode).toBe(0);
    const d = join(small, "p");
    const { code, report, stderr } = await recover("--create", "--dir", d, "--data-size", "64M", "--meta-size", "4M", "--pool", FULL_POOL);
    expect(code).toBe(5);
    expect(report).toMatchObject({ ok: false, action: "blocked", error: { kind: "dm" } });
    expect(report.error!.message).toMatch(/: not enough space: 68 MiB needed for metadata\.img and data\.img, 16 MiB free/);
    // the step list, then exactly one error line (no stack trace)
    const lines = stderr.trim().split("\n");
    expect(lines.at(-1)).toBe(`error: ${report.error!.message} — ${report.error!.hint}`);
    expect(lines.filter((l) => /error|^\s+at /.test(l))).toEqual([lines.at(-1) ?? ""]);
    expect(readdirSync(d)).toEqual([]); // no record, no backing file
    expect(await dmsetup.exists(FULL_POOL)).toBe(false);
  });

  test("fallocate's own ENOSPC stops with no_space; no sparse file stands in for the missing space", async () => {
    const { allocateBackingFile } = await import("../../lib/dm/loop-pool.ts");
    const { isDmError } = await import("../../lib/dm/errors.ts");
    writeFileSync(join(small, "filler"), new Uint8Array(12 * 1024 * 1024)); // 4 MiB left
    const p = join(small, "data.img");
    const e = await allocateBackingFile(p, 8 * 1024 * 1024).catch((x) => x);
    expect(isDmError(e, "no_space")).toBe(true);
    expect(e.message).toContain("No space left on device");
    expect(statSync(p).size).toBe(0);
  });

  test("hostfs (fallocate unsupported) still gets a sparse file of the exact size", async () => {
    const { allocateBackingFile } = await import("../../lib/dm/loop-pool.ts");
    const p = join(base, "sparse.img");
    expect(await allocateBackingFile(p, 5 * 1024 * 1024)).toBe("truncate");
    expect(statSync(p).size).toBe(5 * 1024 * 1024);
  });
});
