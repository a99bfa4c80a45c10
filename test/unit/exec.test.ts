import { afterEach, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { type CmdRecord, CommandError, onCommandRecord, run, runOk } from "../../lib/exec.ts";

let off: (() => void) | undefined;
afterEach(() => off?.());

function capture(): CmdRecord[] {
  const recs: CmdRecord[] = [];
  off = onCommandRecord((r) => recs.push(r));
  return recs;
}

// Running (not a zombie waiting for init to reap it).
const alive = (pid: number) => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
};

describe("run", () => {
  test("a script that ran a command with a long limit exits when it is done, not when the limit would end", async () => {
    const script = `import { run } from "${import.meta.dir}/../../lib/exec.ts"; const r = await run(["true"], { timeoutMs: 600_000 }); console.log(r.exitCode);`;
    const p = Bun.spawn(["bun", "-e", script], { stdout: "pipe", stderr: "pipe" });
    const t0 = performance.now();
    const exited = await Promise.race([p.exited.then(() => true), Bun.sleep(20_000).then(() => false)]);
    if (!exited) p.kill("SIGKILL");
    expect({ exited, stdout: await new Response(p.stdout).text() }).toEqual({ exited: true, stdout: "0\n" });
    expect(performance.now() - t0).toBeLessThan(20_000);
  }, 30_000);

  test("one structured record per call with the context and real exit code", async () => {
    const recs = capture();
    const r = await run(["sh", "-c", "echo out; echo err >&2; exit 3"], { ctx: { pool_name: "p", device_id: 4, device_name: "d" } });
    expect(r.stdout).toBe("out\n");
    expect(r.stderr).toBe("err\n");
    expect(r.exitCode).toBe(3);
    expect(recs).toHaveLength(1);
    expect(recs[0]).toMatchObject({
      pool_name: "p",
      device_id: 4,
      device_name: "d",
      command: "sh -c echo out; echo err >&2; exit 3",
      exit_code: 3,
      timed_out: false,
    });
    expect(Object.keys(recs[0]!).sort()).toEqual([
      "command",
      "device_id",
      "device_name",
      "duration_ms",
      "event",
      "exit_code",
      "pool_name",
      "started_at",
      "timed_out",
    ]);
    // RFC 3339 with milliseconds, when it was spawned
    expect(recs[0]!.started_at).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    expect(Math.abs(Date.parse(recs[0]!.started_at) + recs[0]!.duration_ms - Date.now())).toBeLessThan(2_000);
  });

  test("a command past its timeout is killed and logged with timed_out=true", async () => {
    const recs = capture();
    const t0 = performance.now();
    const r = await run(["sleep", "30"], { timeoutMs: 200 });
    expect(performance.now() - t0).toBeLessThan(5_000);
    expect(r.timedOut).toBe(true);
    expect(r.exitCode).toBeNull();
    expect(recs[0]?.timed_out).toBe(true);
  });

  test("SIGTERM is escalated to SIGKILL, and the whole process group dies", async () => {
    const pidFile = `/tmp/thinimg-exec-test-${process.pid}`;
    // the shell ignores TERM and starts a child that also ignores it
    const r = await run(["sh", "-c", `trap '' TERM; (trap '' TERM; sleep 30) & echo $! > ${pidFile}; wait`], {
      timeoutMs: 300,
      killGraceMs: 300,
    });
    expect(r.timedOut).toBe(true);
    expect(r.signal).toBe("SIGKILL");
    const child = Number(await Bun.file(pidFile).text());
    await Bun.sleep(100);
    expect(alive(child)).toBe(false);
  });

  test("missing binary is exit 127 with a record, not a crash", async () => {
    const recs = capture();
    const r = await run(["thinimg-no-such-binary-xyz"]);
    expect(r.exitCode).toBe(127);
    expect(recs).toHaveLength(1);
  });

  test("runOk throws CommandError naming the command and stderr's last line", async () => {
    const e = await runOk(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 2"]).catch((x) => x);
    expect(e).toBeInstanceOf(CommandError);
    expect(e.message).toContain("exit 2: the reason");
  });

  test('stdout "ignore": no output read, stderr and the exit code still are', async () => {
    const r = await run(["sh", "-c", "echo out; echo err >&2; exit 3"], { stdout: "ignore" });
    expect([r.stdout, r.stderr, r.exitCode, r.timedOut]).toEqual(["", "err\n", 3, false]);
    expect((await run(["sh", "-c", "echo out"])).stdout).toBe("out\n");
  });

  test("arguments are passed as argv, never through a shell", async () => {
    const r = await run(["echo", "$(id)", ";", "rm -rf /"]);
    expect(r.stdout).toBe("$(id) ; rm -rf /\n");
    await expect(run(["echo", "a\0b"])).rejects.toThrow(/invalid argument/);
  });
});

// Pids whose command line is exactly argv (our own unique sleeps).
function pidsRunning(argv: string[]): number[] {
  const want = `${argv.join("\0")}\0`;
  const found: number[] = [];
  for (const p of readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if (readFileSync(`/proc/${p}/cmdline`, "latin1") === want && alive(Number(p))) found.push(Number(p));
    } catch {}
  }
  return found;
}

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const until = performance.now() + ms;
  while (performance.now() < until) {
    if (cond()) return true;
    await Bun.sleep(20);
  }
  return cond();
}

describe("commands do not outlive thinimg", () => {
  const execPath = `${import.meta.dir}/../../lib/exec.ts`;
  let n = 0;
  // a unique duration per test so we find exactly our grandchild
  const uniqueSleep = () => ["sleep", `${4000 + (process.pid % 1000)}.${++n}${Date.now() % 1000}`];

  for (const [sig, code] of [
    ["SIGINT", 130],
    ["SIGTERM", 143],
    ["SIGHUP", 129],
  ] as const) {
    test(`${sig} to a process running a command stops it (exit ${code}) and kills the command's group`, async () => {
      const argv = uniqueSleep();
      const script = `import { run } from "${execPath}"; await run(${JSON.stringify(argv)}, { timeoutMs: 600_000 }); console.log("finished");`;
      const p = Bun.spawn(["bun", "-e", script], { stdout: "pipe", stderr: "pipe" });
      try {
        expect(await waitFor(() => pidsRunning(argv).length === 1, 15_000)).toBe(true);
        const [grandchild] = pidsRunning(argv);
        p.kill(sig);
        const exit = await Promise.race([p.exited, Bun.sleep(10_000).then(() => "hung")]);
        const gone = await waitFor(() => !alive(grandchild!), 5_000);
        // one assertion with everything: a failure under load says which part went wrong
        expect({ exit, gone, left: pidsRunning(argv), stdout: await new Response(p.stdout).text(), stderr: await new Response(p.stderr).text() }).toEqual({
          exit: code,
          gone: true,
          left: [],
          stdout: "",
          stderr: "",
        });
      } finally {
        p.kill("SIGKILL");
        for (const pid of pidsRunning(argv)) process.kill(-pid, "SIGKILL"); // each is its group's leader
      }
    }, 30_000);
  }

  test("a script's own SIGTERM handler keeps control; the command's group still dies when the script exits", async () => {
    const argv = uniqueSleep();
    // like gc: on SIGTERM, note it, finish up a little later, then exit 0 while the command still runs
    const script = `import { run } from "${execPath}";
      process.on("SIGTERM", () => { console.log("stopping"); setTimeout(() => process.exit(0), 700); });
      await run(${JSON.stringify(argv)}, { timeoutMs: 600_000 });
      console.log("finished");`;
    const p = Bun.spawn(["bun", "-e", script], { stdout: "pipe", stderr: "pipe" });
    try {
      expect(await waitFor(() => pidsRunning(argv).length === 1, 15_000)).toBe(true);
      const [grandchild] = pidsRunning(argv);
      p.kill("SIGTERM");
      await Bun.sleep(300);
      // the script decides: the command is not killed at the signal
      expect(alive(grandchild!)).toBe(true);
      expect(await Promise.race([p.exited, Bun.sleep(10_000).then(() => "hung")])).toBe(0);
      expect(await new Response(p.stdout).text()).toBe("stopping\n");
      expect(await waitFor(() => !alive(grandchild!), 2_000)).toBe(true);
    } finally {
      p.kill("SIGKILL");
      for (const pid of pidsRunning(argv)) process.kill(-pid, "SIGKILL"); // each is its group's leader
    }
  }, 30_000);

  test("a command that ignores SIGTERM is SIGKILLed when the process exits", async () => {
    const marker = `thinimg-exit-test-${process.pid}-${Date.now()}`;
    const argv = ["sh", "-c", `trap '' TERM; sleep 600; : ${marker}`];
    const script = `import { run } from "${execPath}"; run(${JSON.stringify(argv)}, { timeoutMs: 600_000 }); setTimeout(() => process.exit(3), 500);`;
    const p = Bun.spawn(["bun", "-e", script], { stdout: "pipe", stderr: "pipe" });
    try {
      expect(await waitFor(() => pidsRunning(argv).length === 1, 15_000)).toBe(true);
      const [sh] = pidsRunning(argv);
      expect(await Promise.race([p.exited, Bun.sleep(10_000).then(() => "hung")])).toBe(3);
      expect(await waitFor(() => !alive(sh!), 2_000)).toBe(true);
    } finally {
      p.kill("SIGKILL");
      for (const pid of pidsRunning(argv)) process.kill(-pid, "SIGKILL"); // each is its group's leader
    }
  }, 30_000);
});

describe("command records on stderr", () => {
  const logPath = `${import.meta.dir}/../../lib/log.ts`;
  const execPath = `${import.meta.dir}/../../lib/exec.ts`;
  /** stderr of a script that runs: a success, a failure, a probe's expected failure, a timeout. */
  async function stderrOf(setup: string): Promise<string[]> {
    const script = `import { run } from "${execPath}"; import { setLogFormat, setLogLevel } from "${logPath}"; ${setup}
      await run(["true"], { ctx: { pool_name: "p1", device_id: 3, device_name: "d1" } });
      await run(["false"]);
      await run(["sh", "-c", "exit 4"], { probe: true });
      await run(["sleep", "5"], { timeoutMs: 100, killGraceMs: 100 });`;
    const p = Bun.spawn(["bun", "-e", script], { stdout: "pipe", stderr: "pipe", env: { ...process.env, THINIMG_LOG_LEVEL: "", THINIMG_LOG_FORMAT: "" } });
    const [err, code] = await Promise.all([new Response(p.stderr).text(), p.exited]);
    expect(code).toBe(0);
    return err.split("\n").filter(Boolean);
  }

  test("--log-format json: every command's record (info), failures and timeouts at warn — even with the level lowered to error", async () => {
    const lines = (await stderrOf(`setLogFormat("json"); setLogLevel("error");`)).map((l) => JSON.parse(l));
    expect(lines.map((l) => [l.event, l.level, l.command, l.exit_code, l.timed_out])).toEqual([
      ["cmd", "info", "true", 0, false],
      ["cmd", "warn", "false", 1, false],
      ["cmd", "info", "sh -c exit 4", 4, false],
      ["cmd", "warn", "sleep 5", null, true],
    ]);
    expect(lines[0]).toMatchObject({ pool_name: "p1", device_id: 3, device_name: "d1" });
    expect(typeof lines[0].duration_ms).toBe("number");
  }, 20_000);

  test("human format: failed and timed-out records are never hidden; successes only with --verbose (debug)", async () => {
    const quiet = await stderrOf(`setLogLevel("error");`);
    expect(quiet).toHaveLength(2);
    expect(quiet[0]).toStartWith('[warn] {"event":"cmd"');
    expect(quiet[0]).toContain('"command":"false","duration_ms"');
    expect(quiet[1]).toContain('"command":"sleep 5"');
    expect(quiet[1]).toContain('"timed_out":true');
    const verbose = await stderrOf(`setLogLevel("debug");`);
    expect(verbose.map((l) => JSON.parse(l.replace(/^\[\w+\] /, "")).command)).toEqual(["true", "false", "sh -c exit 4", "sleep 5"]);
  }, 20_000);
});
