import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { classifyKernelLine } from "../../lib/health/dmesg.ts";

describe("runMain", () => {
  test("large --json output through a pipe arrives whole before exit", async () => {
    const p = Bun.spawn(["bun", join(import.meta.dir, "../helpers/big-json-cli.ts")], { stdout: "pipe", stderr: "pipe" });
    const out = await new Response(p.stdout).text();
    expect(await p.exited).toBe(0);
    expect(out.length).toBeGreaterThan(1_000_000);
    expect((JSON.parse(out) as { items: unknown[] }).items).toHaveLength(20000);
  });

  test("unknown flags are refused with one line and exit 2", async () => {
    const p = Bun.spawn(["bun", join(import.meta.dir, "../../scripts/health.ts"), "--no-such-flag"], { stdout: "pipe", stderr: "pipe" });
    const err = await new Response(p.stderr).text();
    expect(await p.exited).toBe(2);
    expect(err.trim().split("\n")).toEqual(["error: unknown option --no-such-flag — see --help"]);
  });
});

const MAIN = join(import.meta.dir, "../../lib/cli/main.ts");
const tmp = mkdtempSync("/tmp/thinimg-cli-main-");
let n = 0;
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Run a one-off citty command through runMain; returns exit code, stdout, stderr. */
async function cli(body: string, args: string[]): Promise<{ code: number; out: string; err: string }> {
  const file = join(tmp, `cmd${++n}.ts`);
  // a plain command object (no bare "citty" import: the file lives outside the project)
  writeFileSync(file, `import { runMain } from "${MAIN}"; const defineCommand = (c) => c; ${body}`);
  const p = Bun.spawn(["bun", file, ...args], { stdout: "pipe", stderr: "pipe", cwd: join(import.meta.dir, "../..") });
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  return { code, out, err };
}

describe("filesystem errors", () => {
  test("an errno error from the command is one line with the path and a hint, and a --json error", async () => {
    const body = `import { mkdirSync } from "node:fs";
      await runMain(defineCommand({ args: { json: { type: "boolean" } }, run() { mkdirSync("/proc/x-nope/y", { recursive: true }); } }));`;
    const { code, out, err } = await cli(body, ["--json"]);
    expect(code).toBe(7);
    expect(err.trim().split("\n")).toEqual([
      "error: mkdir /proc/x-nope/y: no such file or directory (ENOENT) — check the path (and that the filesystem holding it is mounted)",
    ]);
    expect(JSON.parse(out)).toMatchObject({ ok: false, error: { kind: "missing", details: { errno: "ENOENT", path: "/proc/x-nope/y" } } });
  });

  test("a non-errno bug still gets its stack trace (exit 70)", async () => {
    const { code, err } = await cli(`await runMain(defineCommand({ run() { throw new TypeError("boom"); } }));`, []);
    expect(code).toBe(70);
    expect(err).toMatch(/^internal error: TypeError: boom\n\s+at /);
  });
});

describe("command records", () => {
  test("recover-pool --log-format json puts each command's record on stderr as a JSON line", async () => {
    const p = Bun.spawn(["bun", join(import.meta.dir, "../../ops/recover-pool.ts"), "--dir", join(tmp, "no-pool"), "--log-format", "json"], {
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, THINIMG_LOG_LEVEL: "", THINIMG_LOG_FORMAT: "" },
    });
    const [err] = await Promise.all([new Response(p.stderr).text(), p.exited]);
    const recs = err.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)).filter((r) => r.event === "cmd");
    expect(recs.length).toBeGreaterThanOrEqual(1);
    expect(recs[0].command).toMatch(/^dmsetup .*version$/);
    expect(Object.keys(recs[0]).sort()).toEqual(["command", "device_id", "device_name", "duration_ms", "event", "exit_code", "level", "pool_name", "timed_out", "ts"]);
  });
});

describe("kernel log rules", () => {
  test("a refused pool message (as the 6.1 kernel prints it) warns, real pool failures block", () => {
    expect(classifyKernelLine("device-mapper: thin: Creation of new thinly-provisioned device with id 3 failed.")?.status).toBe("warn");
    expect(classifyKernelLine("device-mapper: thin: Deletion of thin device 999 failed.")?.status).toBe("warn");
    expect(classifyKernelLine("device-mapper: thin: 254:0: switching pool to read-only mode")?.status).toBe("block");
    expect(classifyKernelLine("device-mapper: thin: 254:0: metadata operation 'dm_pool_commit_metadata' failed: error = -5")?.status).toBe("block");
  });
});
