// scripts/test.ts decisions: filters, VM file split, and reading bun test's real counts.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { countRun, failedTestNames, fileWeight, parseBunSummary, planRun, splitFiles } from "../../lib/vm/testplan.ts";

const VM = ["test/vm/a.test.ts", "test/vm/b.test.ts", "test/vm/c.test.ts"];

describe("planRun", () => {
  test("no filter runs everything", () => {
    expect(planRun([], VM)).toEqual({ check: true, lint: true, unit: ["test/unit"], vm: VM });
  });
  test("words and paths select parts", () => {
    expect(planRun(["unit"], VM)).toEqual({ check: false, lint: false, unit: ["test/unit"], vm: [] });
    expect(planRun(["vm"], VM)).toEqual({ check: false, lint: false, unit: [], vm: VM });
    expect(planRun(["./test/vm/b.test.ts", "test/unit/x.test.ts", "lint"], VM)).toEqual({
      check: false,
      lint: true,
      unit: ["test/unit/x.test.ts"],
      vm: ["test/vm/b.test.ts"],
    });
  });
  test("unknown filters and missing VM files are errors, not silently empty runs", () => {
    expect(() => planRun(["bogus"], VM)).toThrow(/unknown filter bogus/);
    expect(() => planRun(["test/vm/nope.test.ts"], VM)).toThrow(/no VM test file/);
  });
});

describe("splitFiles", () => {
  const sizes: Record<string, number> = { a: 100, b: 60, c: 50, d: 10 };
  test("balances by size over n groups", () => {
    const g = splitFiles(["a", "b", "c", "d"], 2, (f) => sizes[f]!);
    expect(g).toEqual([
      ["a", "d"],
      ["b", "c"],
    ]);
  });
  test("a file's weight is its measured `// vm-seconds: N`, else its size / 100", () => {
    const d = mkdtempSync("/tmp/thinimg-testplan-");
    try {
      writeFileSync(join(d, "slow.test.ts"), "// what it tests\n// vm-seconds: 250 (measured)\nimport x from 'y';\n");
      writeFileSync(join(d, "plain.test.ts"), "x".repeat(5000));
      expect(fileWeight(join(d, "slow.test.ts"))).toBe(250);
      expect(fileWeight(join(d, "plain.test.ts"))).toBe(50);
      expect(fileWeight(join(d, "missing.test.ts"))).toBe(0);
      expect(splitFiles([join(d, "plain.test.ts"), join(d, "slow.test.ts"), join(d, "missing.test.ts")], 2)).toEqual([
        [join(d, "slow.test.ts")],
        [join(d, "missing.test.ts"), join(d, "plain.test.ts")],
      ]);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  });
  test("never more groups than files, never empty groups", () => {
    expect(splitFiles(["a"], 2, (f) => sizes[f]!)).toEqual([["a"]]);
    expect(splitFiles([], 2)).toEqual([]);
  });
});

describe("bun test summary", () => {
  const out = "test/x.test.ts:\n(pass) a\n(fail) b\n\n 12 pass\n 3 fail\n 1 error\n 40 expect() calls\nRan 15 tests across 2 files.\n";
  test("reads the real counts (also through ANSI colour codes)", () => {
    expect(parseBunSummary(out)).toEqual({ pass: 12, fail: 3, found: true });
    expect(parseBunSummary("\x1b[32m 5 pass\x1b[0m\n\x1b[2m 0 fail\x1b[0m\n")).toEqual({ pass: 5, fail: 0, found: true });
  });
  test("a test named '3 pass' does not count; only summary lines do", () => {
    expect(parseBunSummary("(pass) 3 pass things\n 1 pass\n 0 fail\n").pass).toBe(1);
  });
  test("no summary or a bad exit with zero failures counts as one failure", () => {
    expect(countRun("bun test v1.4.5\nSegmentation fault\n", 139)).toEqual({ pass: 0, fail: 1 });
    expect(countRun(" 4 pass\n 0 fail\n", 1)).toEqual({ pass: 4, fail: 1 });
    expect(countRun(" 4 pass\n 0 fail\n", 0)).toEqual({ pass: 4, fail: 0 });
    expect(countRun(" 4 pass\n 2 fail\n", 1)).toEqual({ pass: 4, fail: 2 });
  });
});

describe("scripts/test.ts end to end", () => {
  test("the last line carries bun test's real counts; exit 0 when nothing failed", () => {
    // -t NAME is bun test's filter: only the matching test runs
    const one = Bun.spawnSync(["bun", "scripts/test.ts", "test/unit/vm-testplan.test.ts", "-t", "no filter runs everything"], {
      stdout: "pipe",
      stderr: "pipe",
    });
    expect(one.stdout.toString().trim().split("\n").at(-1)).toBe("1 passed, 0 failed");
    expect(one.exitCode).toBe(0);
    const ok = Bun.spawnSync(["bun", "scripts/test.ts", "test/unit/health.test.ts"], { stdout: "pipe", stderr: "pipe" });
    const out = ok.stdout.toString() + ok.stderr.toString();
    const bunSays = /^\s*(\d+) pass$/m.exec(out)?.[1];
    expect(ok.stdout.toString().trim().split("\n").at(-1)).toBe(`${bunSays} passed, 0 failed`);
    expect(Number(bunSays)).toBeGreaterThanOrEqual(30);
    expect(ok.exitCode).toBe(0);
  }, 60_000);

  test("a VM that cannot boot counts as a failure, never a silent skip", () => {
    const p = Bun.spawnSync(["bun", "scripts/test.ts", "test/vm/health.test.ts"], {
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, THINIMG_VM_KERNEL_ARGS: "rootfstype=ext4 root=/dev/nosuch" },
    });
    expect(p.stdout.toString().trim().split("\n").at(-1)).toBe("0 passed, 1 failed");
    expect(p.stderr.toString()).toContain("VM did not boot");
    expect(p.exitCode).toBe(1);
  }, 120_000);
});

describe("failedTestNames", () => {
  test("reads bun's (fail) lines, with or without a VM prefix or colour, each name once", () => {
    const out = [
      "(pass) a > ok [1.00ms]",
      "[vm1] (fail) pool > goes read-only [3797.20ms]",
      "\x1b[31m(fail)\x1b[0m b > c",
      "",
      "1 tests failed:",
      "[vm1] (fail) pool > goes read-only [3797.20ms]",
    ].join("\n");
    expect(failedTestNames(out)).toEqual(["pool > goes read-only", "b > c"]);
    expect(failedTestNames("(pass) x\n 1 pass\n 0 fail\n")).toEqual([]);
  });
});
