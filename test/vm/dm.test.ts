// lib/dm against the real dm-thin kernel in the VM: every behaviour the product relies on.
// vm-seconds: 25 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import { activeDevice, activeDeviceNames, activeDevices, devStatusIoctl } from "../../lib/dm/active.ts";
import { dmsetup, isDmError, losetup, mkfsExt4, mount, parsePoolStatus, parseThinStatus, pool, thintools } from "../../lib/dm/index.ts";
import { type CmdRecord, onCommandRecord, run } from "../../lib/exec.ts";
import { clearTimeouts } from "../../lib/lock/host-queue.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeTestPool, type TestPool } from "../helpers/pool.ts";

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
    await expect(
      dmsetup.withSuspended(name, async () => {
        expect((await dmsetup.info(name))?.state).toBe("SUSPENDED");
        throw new Error("body failed");
      }),
    ).rejects.toThrow("body failed");
    expect((await dmsetup.info(name))?.state).toBe("ACTIVE");
    await dmsetup.remove(name);
  });

  test("activeDevice's one-name ioctl agrees with dmsetup info and the sysfs scan: loaded, suspended, absent", async () => {
    const name = `${p.name}-t1c`;
    expect(devStatusIoctl(name)).toBeNull();
    expect(await activeDevice(name)).toBeNull();
    await pool.activateThin(p.name, name, 1, GiB);
    const info = await dmsetup.info(name);
    const one = devStatusIoctl(name);
    expect(one).toEqual({ name, major: info!.major, minor: info!.minor, suspended: false });
    expect((await activeDevices()).get(name)).toEqual(one!);
    // the names-only scan (list, re-attach) sees exactly the devices the full scan sees
    expect([...(await activeDeviceNames())].sort()).toEqual([...(await activeDevices()).keys()].sort());
    expect((await activeDeviceNames()).has(name)).toBe(true);
    await dmsetup.withSuspended(name, async () => {
      expect(devStatusIoctl(name)?.suspended).toBe(true);
      expect((await activeDevices()).get(name)?.suspended).toBe(true);
    });
    expect((await activeDevice(name))?.suspended).toBe(false);
    expect(devStatusIoctl(p.name)).toMatchObject({ name: p.name, suspended: false }); // the pool itself
    await dmsetup.remove(name);
    expect(devStatusIoctl(name)).toBeNull();
    expect((await activeDeviceNames()).has(name)).toBe(false);
    // no control node here: the caller falls back to the scan
    expect(devStatusIoctl(name, `${p.dir}/no-control`)).toBeUndefined();
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

describe("typed errors from losetup, mount, umount, mkfs on the real kernel", () => {
  const tag = `${process.pid}`;
  test("not mounted / no such device / busy / I/O error each get their kind, and stay CommandErrors", async () => {
    const { CommandError } = await import("../../lib/exec.ts");
    const { mkdtempSync, rmSync } = await import("node:fs");
    const dir = mkdtempSync("/tmp/thinimg-dm-tools-");
    const err = `ti-err-${tag}`;
    try {
      const notMounted = await mount.umount(dir).catch((e) => e);
      expect(isDmError(notMounted, "not_found")).toBe(true);
      expect(notMounted).toBeInstanceOf(CommandError);
      expect(isDmError(await mount.mount(`/dev/mapper/ti-nope-${tag}`, dir).catch((e) => e), "not_found")).toBe(true);
      expect(isDmError(await losetup.attach(`${dir}/no-such-file`).catch((e) => e), "not_found")).toBe(true);
      // busy: a process sits in the mount
      expect((await run(["mount", "-t", "tmpfs", "none", dir])).exitCode).toBe(0);
      const holder = Bun.spawn(["sleep", "30"], { cwd: dir });
      try {
        await Bun.sleep(100);
        const busy = await mount.umount(dir).catch((e) => e);
        expect(isDmError(busy, "busy")).toBe(true);
        expect([busy.kind, busy.exitCode]).toEqual(["dm", 5]);
      } finally {
        holder.kill("SIGKILL");
        await holder.exited;
      }
      await mount.umount(dir);
      // I/O error: mkfs on a device whose every sector fails
      await dmsetup.create(err, "0 65536 error");
      const io = await mkfsExt4(`/dev/mapper/${err}`).catch((e) => e);
      expect(isDmError(io, "io")).toBe(true);
      expect(io.message).toContain("Input/output error");
    } finally {
      if (await dmsetup.exists(err)) await dmsetup.remove(err);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("withSuspended on the real kernel", () => {
  const tag = `${process.pid}`;
  test("the device is suspended while fn runs and active afterwards — also when fn throws", async () => {
    const name = `${p.name}-sus`;
    await pool.createThin(p.name, 11);
    await pool.activateThin(p.name, name, 11, 1024 * 1024);
    try {
      const seen = await dmsetup.withSuspended(name, async () => (await dmsetup.info(name))?.state);
      expect(seen).toBe("SUSPENDED");
      expect((await dmsetup.info(name))?.state).toBe("ACTIVE");
      const e = await dmsetup
        .withSuspended(name, async () => {
          throw new Error("fn failed");
        })
        .catch((x) => x);
      expect(e.message).toBe("fn failed");
      expect((await dmsetup.info(name))?.state).toBe("ACTIVE");
    } finally {
      await dmsetup.remove(name);
    }
  });

  test("a suspend that times out (I/O stuck on a suspended device below) leaves the device active; fn never runs", async () => {
    const bottom = `${p.name}-bot`;
    const top = `ti-top-${tag}`;
    await pool.createThin(p.name, 12);
    await pool.activateThin(p.name, bottom, 12, 1024 * 1024);
    await dmsetup.create(top, `0 2048 linear /dev/mapper/${bottom} 0`);
    let unblock: ReturnType<typeof setTimeout> | undefined;
    try {
      await dmsetup.suspend(bottom);
      // a read to top is now queued in bottom: suspending top waits for it
      const reader = run(["dd", `if=/dev/mapper/${top}`, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], { timeoutMs: 30_000 });
      await Bun.sleep(300);
      unblock = setTimeout(() => void dmsetup.resume(bottom), 4_000);
      let ran = false;
      const e = await dmsetup.withSuspended(top, async () => (ran = true), { timeoutMs: 1_000 }).catch((x) => x);
      expect(isDmError(e, "timeout")).toBe(true);
      expect(ran).toBe(false);
      // no command after the timeout but the mandatory resume: a remove is refused without being sent
      await expect(dmsetup.remove(top)).rejects.toThrow(/refusing `dmsetup .*remove .*timed out earlier in this run/);
      expect((await reader).exitCode).toBe(0); // bottom resumed: the queued read completes
      expect((await dmsetup.info(top))?.state).toBe("ACTIVE");
      expect((await dmsetup.info(bottom))?.state).toBe("ACTIVE");
    } finally {
      clearTimeout(unblock);
      // teardown is a new "run": the suspend of top timed out, so this process refuses further
      // commands to top until told otherwise (ADR-0001 §4)
      clearTimeouts();
      if ((await dmsetup.info(bottom))?.state === "SUSPENDED") await dmsetup.resume(bottom);
      if ((await dmsetup.info(top))?.state === "SUSPENDED") await dmsetup.resume(top);
      await dmsetup.remove(top);
      await dmsetup.remove(bottom);
    }
  });
});
