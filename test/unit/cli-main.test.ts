import { describe, expect, test } from "bun:test";
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

describe("kernel log rules", () => {
  test("a refused pool message (as the 6.1 kernel prints it) warns, real pool failures block", () => {
    expect(classifyKernelLine("device-mapper: thin: Creation of new thinly-provisioned device with id 3 failed.")?.status).toBe("warn");
    expect(classifyKernelLine("device-mapper: thin: Deletion of thin device 999 failed.")?.status).toBe("warn");
    expect(classifyKernelLine("device-mapper: thin: 254:0: switching pool to read-only mode")?.status).toBe("block");
    expect(classifyKernelLine("device-mapper: thin: 254:0: metadata operation 'dm_pool_commit_metadata' failed: error = -5")?.status).toBe("block");
  });
});
