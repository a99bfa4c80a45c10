// Recovery across a reboot, from the host: two separate VM runs are two boots of a real kernel on
// the same files. Boot 1 creates the pool (the exact documented one-liner, then health), writes a
// random pattern through a thin device and powers off with the pool still loaded. Boot 2 runs
// `bun ops/recover-pool.ts --dir …`, which must bring the same pool back with the bytes intact.
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { RecoverReport } from "../../lib/recover/recover.ts";
import { vmBoot as vm } from "../helpers/run.ts";

const base = mkdtempSync("/tmp/thinimg-recover-reboot-");
afterAll(() => rmSync(base, { recursive: true, force: true }));

const read = (f: string) => readFileSync(join(base, f), "utf8").trim();

test("pool created in one boot comes back in the next with the same table and data", async () => {
  const dir = join(base, "p");
  const pattern = crypto.getRandomValues(new Uint8Array(1024 * 1024));
  writeFileSync(join(base, "pattern"), pattern);
  const thin = `0 131072 thin /dev/mapper/thinimg-pool 1`;

  const boot1 = await vm(`
    bun ops/recover-pool.ts --create --dir ${dir} --data-size 1G --meta-size 32M && bun scripts/health.ts --json > ${base}/health.json
    echo $? > ${base}/accept.rc
    dmsetup message thinimg-pool 0 "create_thin 1" || exit 11
    dmsetup create rt1 --table "${thin}" || exit 12
    dd if=${base}/pattern of=/dev/mapper/rt1 bs=1M seek=2 oflag=direct conv=fsync 2>/dev/null || exit 13
    dmsetup table thinimg-pool > ${base}/table1
    dmsetup status thinimg-pool > ${base}/status1
  `);
  expect(boot1.code, `boot 1 failed:\n${boot1.out}\n${boot1.err}`).toBe(0);
  // the VM powered off with the pool and the thin device still loaded: no clean teardown

  const boot2 = await vm(`
    bun ops/recover-pool.ts --dir ${dir} --json > ${base}/recover.json
    echo $? > ${base}/recover.rc
    dmsetup create rt1 --table "${thin}" || exit 12
    dd if=/dev/mapper/rt1 of=${base}/readback bs=1M skip=2 count=1 iflag=direct 2>/dev/null || exit 13
    dmsetup table thinimg-pool > ${base}/table2
  `);
  expect(boot2.code, `boot 2 failed:\n${boot2.out}\n${boot2.err}`).toBe(0);
  expect(read("recover.rc")).toBe("0");
  const report = JSON.parse(read("recover.json")) as RecoverReport;
  expect(report).toMatchObject({ ok: true, action: "recovered", pool: "thinimg-pool" });
  expect(report.status).toMatchObject({ kind: "ok", mode: "rw", needs_check: false });
  expect(report.steps.find((s) => s.name === "check-metadata")?.status).toBe("ok");
  // same pool: same table (same data length, block size, low water mark, features; loops re-attached)
  expect(read("table2")).toBe(read("table1"));
  expect(read("status1")).toContain(" 16/16384 "); // 1 MiB written = 16 blocks of 64 KiB
  expect(report.status?.data_used).toBe(16);
  expect(Buffer.from(readFileSync(join(base, "readback"))).equals(Buffer.from(pattern))).toBe(true);

  // the documented one-liner: create && health --json prints a healthy report
  expect(read("accept.rc"), `scripts/health.ts --json after --create did not exit 0: ${readFileSync(join(base, "health.json"), "utf8")}`).toBe("0");
  expect((JSON.parse(read("health.json")) as { ok: boolean }).ok).toBe(true);
}, 300_000);
