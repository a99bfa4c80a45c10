// lib/dm against the real dm-thin kernel in the VM: every behaviour the product relies on.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import { dmsetup, isDmError, losetup, mkfsExt4, mount, parsePoolStatus, parseThinStatus, pool, thintools } from "../../lib/dm/index.ts";
import { type CmdRecord, onCommandRecord, run } from "../../lib/exec.ts";
import { requireDm } from "../helpers/kernel.ts";
import { type TestPool, makeTestPool } from "../helpers/pool.ts";

requireDm();
setDefaultTimeout(60_000);

const GiB = 1024 ** 3;
let p: TestPool;

beforeAll(async () => {
  p = await makeTestPool({ dataSize: "256M", metaSize: "8M" });
});
afterAll(async () => {
  await p?.destroy();
});

describe("pool lifecycle on the real kernel", () => {
  test("new pool: rw, transaction 0, error_if_no_space, nothing used", async () => {
    const s = await pool.poolStatus(p.name);
    expect(s.kind).toBe("ok");
    if (s.kind !== "ok") return;
    expect(s.mode).toBe("rw");
    expect(s.transactionId).toBe(0);
    expect(s.noSpace).toBe("error_if_no_space");
    expect(s.needsCheck).toBe(false);
    expect(s.dataUsed).toBe(0);
    expect(s.dataTotal).toBe((256 * 1024 * 1024) / (64 * 1024));
  });

  test("create_thin, activate, mkfs, mount, write; errors typed from the kernel", async () => {
    await pool.createThin(p.name, 1);
    expect(isDmError(await pool.createThin(p.name, 1).catch((e) => e), "exists")).toBe(true);
    const name = `${p.name}-t1`;
    const dev = await pool.activateThin(p.name, name, 1, 1 * GiB);
    expect(dev).toBe(`/dev/mapper/${name}`);
    expect(isDmError(await pool.activateThin(p.name, name, 1, GiB).catch((e) => e), "exists")).toBe(true);
    await mkfsExt4(dev);
    const mnt = `${p.dir}/mnt`;
    await run(["mkdir", "-p", mnt]);
    await mount.mount(dev, mnt, { options: ["nosuid", "nodev"] });
    await Bun.write(`${mnt}/hello`, "thin world");
    const info = await dmsetup.info(name);
    expect(info?.open).toBeGreaterThan(0);
    expect(mount.mountsOf(dev).length + mount.mountsOf(`${info?.major}:${info?.minor}`).length).toBeGreaterThan(0);
    // a mounted device cannot be removed or deleted: typed busy
    expect(isDmError(await dmsetup.remove(name).catch((e) => e), "busy")).toBe(true);
    expect(isDmError(await pool.deleteThin(p.name, 1).catch((e) => e), "busy")).toBe(true);
    await mount.umount(mnt);
    await dmsetup.remove(name);
    expect(await dmsetup.info(name)).toBeNull();
    expect(isDmError(await dmsetup.remove(name).catch((e) => e), "not_found")).toBe(true);
  });

  test("snapshot of an inactive origin needs no suspend and sees the origin's files", async () => {
    await pool.createSnap(p.name, 2, 1);
    const name = `${p.name}-t2`;
    const dev = await pool.activateThin(p.name, name, 2, GiB, { readOnly: true });
    expect((await dmsetup.info(name))?.readOnly).toBe(true);
    const mnt = `${p.dir}/mnt2`;
    await run(["mkdir", "-p", mnt]);
    await mount.mount(dev, mnt, { readOnly: true });
    expect(readFileSync(`${mnt}/hello`, "utf8")).toBe("thin world");
    await mount.umount(mnt);
    const ts = parseThinStatus(await dmsetup.status(name));
    expect(ts.kind === "ok" && ts.mappedSectors).toBeGreaterThan(0);
    await dmsetup.remove(name);
  });

  test("suspend/resume, and withSuspended always resumes", async () => {
    const name = `${p.name}-t1b`;
    await pool.activateThin(p.name, name, 1, GiB);
    await expect(dmsetup.withSuspended(name, async () => {
      expect((await dmsetup.info(name))?.state).toBe("SUSPENDED");
      throw new Error("body failed");
    })).rejects.toThrow("body failed");
    expect((await dmsetup.info(name))?.state).toBe("ACTIVE");
    await dmsetup.remove(name);
  });

  test("delete of a missing id is typed not_found; set_transaction_id is a compare-and-swap", async () => {
    expect(isDmError(await pool.deleteThin(p.name, 999).catch((e) => e), "not_found")).toBe(true);
    const before = await pool.poolStatusOk(p.name);
    await pool.setTransactionId(p.name, before.transactionId, before.transactionId + 1);
    const wrong = await pool.setTransactionId(p.name, before.transactionId, before.transactionId + 2).catch((e) => e);
    expect(isDmError(wrong)).toBe(true);
    expect((await pool.poolStatusOk(p.name)).transactionId).toBe(before.transactionId + 1);
  });

  test("metadata snapshot: held root shows in status, thin_ls sees every id, release clears it", async () => {
    await pool.reserveMetadataSnap(p.name);
    try {
      const s = await pool.poolStatusOk(p.name);
      expect(s.heldRoot).not.toBeNull();
      expect(isDmError(await pool.reserveMetadataSnap(p.name).catch((e) => e), "busy")).toBe(true);
      const ids = (await thintools.thinLs(p.metaDev, { metadataSnap: true })).map((e) => e.id).sort();
      expect(ids).toEqual([1, 2]);
      expect(thintools.parseThinDumpIds(await thintools.thinDump(p.metaDev, { metadataSnap: true })).sort()).toEqual([1, 2]);
    } finally {
      await pool.releaseMetadataSnap(p.name);
    }
    expect((await pool.poolStatusOk(p.name)).heldRoot).toBeNull();
  });

  test("ls and infoAll list the pool and its devices; loops are found by backing file", async () => {
    expect((await dmsetup.ls("thin-pool")).map((d) => d.name)).toContain(p.name);
    expect((await dmsetup.infoAll()).map((d) => d.name)).toContain(p.name);
    expect(await losetup.findByFile(p.dataFile)).toBe(p.dataDev);
    expect(pool.parsePoolTable(await dmsetup.table(p.name))).toMatchObject({ blockSectors: 128, features: ["error_if_no_space"] });
  });
});

describe("timeouts and faults on the real kernel", () => {
  test("a command stuck on a suspended device is abandoned at its timeout, logged timed_out=true; the device is resumed", async () => {
    // I/O on a suspended device blocks in uninterruptible sleep: not even SIGKILL ends it until
    // resume. The runner must give up on it rather than wedge the caller.
    const name = `${p.name}-hang`;
    const dev = await pool.activateThin(p.name, name, 1, GiB);
    const recs: CmdRecord[] = [];
    const off = onCommandRecord((r) => recs.push(r));
    try {
      await dmsetup.withSuspended(name, async () => {
        const r = await run(["dd", `if=${dev}`, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], {
          timeoutMs: 500,
          killGraceMs: 200,
          ctx: { pool_name: p.name, device_id: 1, device_name: name },
        });
        expect(r.timedOut).toBe(true);
      });
    } finally {
      off();
    }
    const rec = recs.find((r) => r.command.startsWith("dd "));
    expect(rec).toMatchObject({ pool_name: p.name, device_id: 1, device_name: name, timed_out: true });
    expect((await dmsetup.info(name))?.state).toBe("ACTIVE");
    await Bun.sleep(200);
    await dmsetup.remove(name);
  });

  test("a pool filled up goes out_of_data_space and writes fail (error_if_no_space)", async () => {
    const small = await makeTestPool({ dataSize: "16M", metaSize: "4M" });
    try {
      await pool.createThin(small.name, 1);
      const dev = await pool.activateThin(small.name, `${small.name}-fill`, 1, 64 * 1024 * 1024);
      const r = await run(["dd", "if=/dev/zero", `of=${dev}`, "bs=1M", "count=32", "oflag=direct"], { timeoutMs: 60_000 });
      expect(r.exitCode).not.toBe(0);
      const s = parsePoolStatus(await dmsetup.status(small.name));
      expect(s.kind === "ok" && s.mode).toBe("out_of_data_space");
      expect(s.kind === "ok" && s.dataUsedPct).toBe(100);
    } finally {
      await small.destroy();
    }
  });
});
