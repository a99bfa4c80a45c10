// Health checks against real pools and the real kernel log in the VM.
// vm-seconds: 45 (its run time in one test VM; `bun run test` balances the VMs by it)
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { dmsetup, pool } from "../../lib/dm/index.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { run } from "../../lib/exec.ts";
import { assertHealthy, type HealthReport, runHealthChecks } from "../../lib/health/index.ts";
import { primeKernelLogCursor } from "../helpers/health.ts";
import { requireDm } from "../helpers/kernel.ts";
import { makeFlakyPool, makeTestPool, type TestPool } from "../helpers/pool.ts";

requireDm();

const MiB = 1024 ** 2;
const T = 60_000;
const dirs: string[] = [];
const stateDir = () => {
  const d = mkdtempSync("/tmp/thinimg-health-state-");
  dirs.push(d);
  return d;
};
const check = (r: HealthReport, name: string) => {
  const c = r.checks.find((x) => x.name === name);
  if (!c) throw new Error(`no check ${name} in ${r.checks.map((x) => x.name).join(",")}`);
  return c;
};

afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe("a fresh pool", () => {
  let p: TestPool;
  beforeAll(async () => {
    p = await makeTestPool({ dataSize: "64M", metaSize: "4M" });
  }, T);
  afterAll(async () => {
    await p?.destroy();
  }, T);

  test(
    "is healthy: every check ran and none blocks",
    async () => {
      const sd = stateDir();
      await primeKernelLogCursor(sd);
      const r = await runHealthChecks({ pool: p.name, stateDir: sd });
      const names = r.checks.map((c) => c.name);
      for (const n of [
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
      ]) {
        expect(names).toContain(n);
      }
      // pool and dm checks are all ok; host load (iowait/memory of a busy CI box) may at most warn
      expect(r.checks.filter((c) => c.name.startsWith("pool.") && c.status !== "ok")).toEqual([]);
      expect(check(r, "host.dstate").status).toBe("ok");
      expect(check(r, "host.dmesg").status).toBe("ok");
      expect(r.checks.filter((c) => c.status === "block")).toEqual([]);
      expect(r.healthy).toBe(true);
      expect(check(r, "pool.mode").message).toBe("mode rw");
      expect(check(r, "pool.data").details?.used_pct).toBe(0);
      // assertHealthy agrees and returns the report
      expect((await assertHealthy({ pool: p.name, stateDir: sd })).healthy).toBe(true);
    },
    T,
  );

  test(
    "data use over the warn threshold warns but stays healthy; over the block threshold blocks",
    async () => {
      await pool.createThin(p.name, 7);
      const name = `${p.name}-t7`;
      await pool.activateThin(p.name, name, 7, 64 * MiB);
      // 40 of 64 MiB → ~62 % of data blocks
      const w = await run(["dd", "if=/dev/urandom", `of=/dev/mapper/${name}`, "bs=1M", "count=40", "oflag=direct"], { timeoutMs: T });
      expect(w.exitCode).toBe(0);
      const sd = stateDir();
      await primeKernelLogCursor(sd);
      const warn = await runHealthChecks({ pool: p.name, stateDir: sd, thresholds: { dataWarnPct: 50, dataBlockPct: 90 } });
      expect(check(warn, "pool.data").status).toBe("warn");
      expect(warn.healthy).toBe(true);
      const block = await runHealthChecks({ pool: p.name, stateDir: sd, thresholds: { dataWarnPct: 40, dataBlockPct: 60 } });
      expect(check(block, "pool.data").status).toBe("block");
      expect(block.healthy).toBe(false);
      await dmsetup.remove(name);
      await pool.deleteThin(p.name, 7);
    },
    T,
  );
});

test(
  "a pool filled to out_of_data_space blocks with that reason (library and CLI)",
  async () => {
    const p = await makeTestPool({ dataSize: "32M", metaSize: "4M" });
    try {
      const sd = stateDir();
      await primeKernelLogCursor(sd);
      await pool.createThin(p.name, 1);
      const dev = `${p.name}-big`;
      await pool.activateThin(p.name, dev, 1, 128 * MiB); // thin device 4x the pool
      const dd = await run(["dd", "if=/dev/zero", `of=/dev/mapper/${dev}`, "bs=1M", "count=64", "oflag=direct"], { timeoutMs: T });
      expect(dd.exitCode).not.toBe(0); // error_if_no_space: the writer gets ENOSPC/EIO instead of hanging
      const st = await pool.poolStatus(p.name);
      expect(st.kind === "ok" && st.mode).toBe("out_of_data_space");

      const r = await runHealthChecks({ pool: p.name, stateDir: sd });
      expect(r.healthy).toBe(false);
      expect(check(r, "pool.mode").status).toBe("block");
      expect(check(r, "pool.mode").message).toContain("out_of_data_space");
      expect(check(r, "pool.mode").runbook).toContain("gc.ts --force");
      expect(check(r, "pool.data").status).toBe("block");
      // the kernel said so too, and that line is new since the cursor
      expect(check(r, "host.dmesg").status).toBe("block");
      expect(check(r, "host.dmesg").message).toContain("out-of-data-space");
      expect(check(r, "host.dmesg").message).toContain(`(${p.name})`);

      let err: unknown;
      await assertHealthy({ pool: p.name, stateDir: stateDir() }).catch((e) => {
        err = e;
      });
      expect(err).toBeInstanceOf(ThinimgError);
      const te = err as ThinimgError;
      expect(te.kind).toBe("unhealthy");
      expect(te.message).toContain("out_of_data_space");
      expect(te.hint).toContain("docs/ops-health.md");

      const cli = Bun.spawnSync(["bun", "scripts/health.ts", "--pool", p.name, "--state-dir", stateDir(), "--json"], { stdout: "pipe", stderr: "pipe" });
      expect(cli.exitCode).toBe(1);
      const doc = JSON.parse(cli.stdout.toString()) as HealthReport & { ok: boolean };
      expect(doc.ok).toBe(false);
      expect(doc.checks.find((c) => c.name === "pool.mode")?.status).toBe("block");
      expect(cli.stderr.toString()).toContain("blocked: pool.mode: pool");
      expect(cli.stderr.toString()).toContain("next step:");
      await dmsetup.remove(dev);
    } finally {
      await p.destroy();
    }
  },
  T,
);

test(
  "dm I/O errors (dm-flakey under the pool): the block survives any number of health runs until --ack, or until the window passes",
  async () => {
    const dir = stateDir();
    const name = `flk${process.pid}`;
    const fk = await makeFlakyPool(`${dir}/pool`, name);
    const sd = stateDir();
    const health = (...args: string[]) => {
      const p = Bun.spawnSync(["bun", "scripts/health.ts", "--pool", name, "--state-dir", sd, "--json", ...args], { stdout: "pipe", stderr: "pipe" });
      return { code: p.exitCode, r: JSON.parse(p.stdout.toString()) as HealthReport & { acknowledged?: unknown[] }, err: p.stderr.toString() };
    };
    type Finding = { line: string; age_s: number; acknowledged: boolean; acknowledged_by: string | null };
    const findings = (r: HealthReport) => (check(r, "host.dmesg").details?.findings ?? []) as Finding[];
    try {
      await pool.createThin(name, 1);
      await pool.activateThin(name, `${name}-t1`, 1, 16 * MiB);
      // data written while healthy, so that reading it goes to the pool's data device
      await run(["dd", "if=/dev/urandom", `of=/dev/mapper/${name}-t1`, "bs=64k", "count=4", "oflag=direct"], { timeoutMs: T });
      await primeKernelLogCursor(sd);
      expect(health().code).toBe(0);
      await fk.fail();
      // a buffered read fails under the pool: the page cache logs "Buffer I/O error on dev dm-N"
      // (a failed read does not change the pool's mode, so the pool itself stays healthy)
      const rd = await run(["dd", `if=/dev/mapper/${name}-t1`, "of=/dev/null", "bs=4k", "count=1"], { timeoutMs: T });
      expect(rd.exitCode).not.toBe(0);
      await fk.heal();
      const first = health();
      expect(first.code).toBe(1);
      expect(check(first.r, "host.dmesg").status).toBe("block");
      expect(first.err).toContain("blocked: host.dmesg:");
      // GC's health run, another process's, the operator's: none of them clears it
      for (let i = 0; i < 3; i++) {
        const again = await runHealthChecks({ pool: name, stateDir: sd });
        expect(check(again, "host.dmesg").status).toBe("block");
        expect(findings(again).every((f) => !f.acknowledged && f.age_s >= 0)).toBe(true);
      }
      const again = health();
      expect(again.code).toBe(1);
      expect(findings(again.r).length).toBeGreaterThan(0);
      await expect(assertHealthy({ pool: name, stateDir: sd })).rejects.toThrow("host.dmesg");

      // a short window: the same errors stop blocking once that old, without anyone acknowledging
      await Bun.sleep(2100);
      expect(health("--kernel-error-window", "1h").code).toBe(1);
      const expired = Bun.spawnSync(["bun", "scripts/health.ts", "--pool", name, "--state-dir", sd], {
        env: { ...process.env, THINIMG_KERNEL_ERROR_WINDOW: "2s" },
        stdout: "pipe",
        stderr: "pipe",
      });
      expect(expired.exitCode, expired.stderr.toString()).toBe(0);

      // the default window: the operator acknowledges; the next run and every later one pass
      const acked = health("--ack");
      expect(acked.code, acked.err).toBe(0);
      expect(acked.err).toMatch(/acknowledged \d+ kernel error\(s\) as /);
      expect(acked.r.acknowledged?.length).toBe(findings(first.r).length);
      expect(findings(acked.r).every((f) => f.acknowledged && f.acknowledged_by)).toBe(true);
      expect(readFileSync(`${sd}/health-ack.log`, "utf8")).toContain(findings(first.r)[0]!.line);
      expect(health().code).toBe(0);
      expect(check(await runHealthChecks({ pool: name, stateDir: sd }), "host.dmesg").status).toBe("ok");
    } finally {
      await fk.heal().catch(() => {});
      await dmsetup.remove(`${name}-t1`).catch(() => {});
      await fk.destroy();
    }
  },
  3 * T, // a dozen CLI runs, each a bun start in UML
);

test(
  "a process stuck on a suspended dm device is a D-state finding",
  async () => {
    const p = await makeTestPool({ dataSize: "32M", metaSize: "4M" });
    const dev = `${p.name}-sus`;
    let reader: ReturnType<typeof Bun.spawn> | undefined;
    try {
      await pool.createThin(p.name, 1);
      await pool.activateThin(p.name, dev, 1, 16 * MiB);
      await dmsetup.suspend(dev);
      reader = Bun.spawn(["dd", `if=/dev/mapper/${dev}`, "of=/dev/null", "bs=4k", "count=1", "iflag=direct"], { stdout: "ignore", stderr: "ignore" });
      await Bun.sleep(500);
      const sd = stateDir();
      await primeKernelLogCursor(sd);
      const r = await runHealthChecks({ pool: p.name, stateDir: sd });
      const d = check(r, "host.dstate");
      expect(d.status).toBe("block");
      expect(d.message).toContain(`${reader.pid} dd`);
      expect(r.healthy).toBe(false);
      await dmsetup.resume(dev);
      expect(await reader.exited).toBe(0);
      const after = await runHealthChecks({ pool: p.name, stateDir: sd });
      expect(check(after, "host.dstate").status).toBe("ok");
    } finally {
      await dmsetup.resume(dev).catch(() => {});
      reader?.kill("SIGKILL");
      await dmsetup.remove(dev).catch(() => {});
      await p.destroy();
    }
  },
  T,
);

test(
  "a pool that does not exist blocks with 'pool not found'",
  async () => {
    const r = await runHealthChecks({ pool: "thinimg-no-such-pool", stateDir: stateDir() });
    expect(r.healthy).toBe(false);
    const e = check(r, "pool.exists");
    expect(e.status).toBe("block");
    expect(e.message).toContain("pool thinimg-no-such-pool not found");
    expect(e.runbook).toContain("bun ops/recover-pool.ts");
  },
  T,
);

test(
  "a check past its timeout is itself a blocking result",
  async () => {
    // a pool whose status read goes through a device we suspend is not enough (status does not
    // wait on I/O), so bound the check to 1 ms: the real dmsetup cannot answer that fast
    const r = await runHealthChecks({ pool: "thinimg-no-such-pool", stateDir: stateDir(), timeoutMs: 1 });
    const c = r.checks.find((x) => x.details?.timed_out === true);
    expect(c?.status).toBe("block");
    expect(c?.message).toContain("did not finish within 1 ms");
    expect(r.healthy).toBe(false);
  },
  T,
);
