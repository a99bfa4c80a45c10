// Pure parts of `bun run test` (scripts/test.ts): what to run for the given filters, how to share VM
// test files between VMs, and reading bun test's own summary counts.
import { readFileSync, statSync } from "node:fs";

export interface Plan {
  check: boolean;
  lint: boolean;
  /** Paths for `bun test` on the host; [] = none; ["test/unit"] = all. */
  unit: string[];
  /** test/vm files to run inside VMs. */
  vm: string[];
}

/**
 * No filters: everything. Words: `unit`, `vm`, `check`, `lint`. Paths: a file or directory under
 * test/unit goes to the host, under test/vm into a VM.
 */
export function planRun(filters: string[], vmFiles: string[]): Plan {
  if (filters.length === 0) return { check: true, lint: true, unit: ["test/unit"], vm: vmFiles };
  const plan: Plan = { check: false, lint: false, unit: [], vm: [] };
  for (const raw of filters) {
    const f = raw.replace(/^\.\//, "").replace(/\/+$/, "");
    if (f === "unit") plan.unit.push("test/unit");
    else if (f === "vm") plan.vm.push(...vmFiles);
    else if (f === "check") plan.check = true;
    else if (f === "lint") plan.lint = true;
    else if (f === "test/vm" || f.startsWith("test/vm/")) {
      const inDir = vmFiles.filter((v) => v === f || v.startsWith(`${f}/`));
      if (inDir.length === 0) throw new Error(`no VM test file matches ${raw}`);
      plan.vm.push(...inDir);
    } else if (f === "test/unit" || f.startsWith("test/unit/")) plan.unit.push(f);
    else throw new Error(`unknown filter ${raw}: use unit, vm, check, lint, or a path under test/unit or test/vm`);
  }
  plan.unit = [...new Set(plan.unit)];
  plan.vm = [...new Set(plan.vm)];
  return plan;
}

/** Greedy split by expected run time (fileWeight) into at most n non-empty groups. */
export function splitFiles(files: string[], n: number, size: (f: string) => number = fileWeight): string[][] {
  const groups: { files: string[]; weight: number }[] = Array.from({ length: Math.max(1, Math.min(n, files.length)) }, () => ({
    files: [],
    weight: 0,
  }));
  const sorted = [...files].sort((a, b) => size(b) - size(a) || a.localeCompare(b));
  for (const f of sorted) {
    const g = groups.reduce((min, x) => (x.weight < min.weight ? x : min), groups[0]!);
    g.files.push(f);
    g.weight += size(f);
  }
  return groups.map((g) => g.files.sort()).filter((g) => g.length > 0);
}

/** A VM test file's expected run time: its `// vm-seconds: N` line (measured), else its size as a
 * rough proxy (100 bytes ≈ 1 s). */
export function fileWeight(f: string): number {
  try {
    const m = /^\/\/ vm-seconds: (\d+)/m.exec(readFileSync(f, "utf8").slice(0, 8192));
    return m ? Number(m[1]) : statSync(f).size / 100;
  } catch {
    return 0;
  }
}

const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;

/** bun test's summary (" N pass", " N fail"); found=false when the run never got to print one. */
export function parseBunSummary(output: string): { pass: number; fail: number; found: boolean } {
  const text = output.replace(ANSI, "");
  const pass = [...text.matchAll(/^\s*(\d+) pass$/gm)].at(-1);
  const fail = [...text.matchAll(/^\s*(\d+) fail$/gm)].at(-1);
  return { pass: pass ? Number(pass[1]) : 0, fail: fail ? Number(fail[1]) : 0, found: pass !== undefined || fail !== undefined };
}

/** Counts for one bun test run: a missing summary or a non-zero exit with no failures counts as one failure. */
export function countRun(output: string, exitCode: number | null): { pass: number; fail: number } {
  const s = parseBunSummary(output);
  let fail = s.fail;
  if (!s.found || (exitCode !== 0 && fail === 0)) fail += 1;
  return { pass: s.pass, fail };
}

/** Names of the tests bun reported as failed ("(fail) describe > name [12.3ms]"), in order. */
export function failedTestNames(output: string): string[] {
  const text = output.replace(ANSI, "");
  // bun repeats the failures in its summary: keep each name once.
  return [...new Set([...text.matchAll(/^(?:\[[^\]]+\] )?\(fail\) (.+?)(?: \[[\d.]+m?s\])?$/gm)].map((m) => m[1]!))];
}
