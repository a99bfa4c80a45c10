// bun run test [unit|vm|check|lint|test/unit/x.test.ts|test/vm/y.test.ts ...] [-t NAME]
// Type-check + lint, host unit tests, then test/vm/*.test.ts inside UML VMs (split over --vms VMs in
// parallel). Output streams live; the last line is "N passed, N failed" from bun test's real counts
// (a failed type-check/lint, a VM that cannot boot or a run without a summary each count as 1 failed).
// THINIMG_VM_KERNEL_ARGS="…" appends kernel arguments to every test VM (debugging, e.g. loglevel=8).
import { readdirSync } from "node:fs";
import { defineCommand } from "citty";
import { runMain } from "../lib/cli/main.ts";
import { ThinimgError, usageError } from "../lib/errors.ts";
import { parseDuration, parseIntArg } from "../lib/util/units.ts";
import { countRun, failedTestNames, planRun, splitFiles } from "../lib/vm/testplan.ts";
import { runInVm, tail, VmError } from "../lib/vm/uml.ts";

type Totals = { pass: number; fail: number; failed: string[] };

// bunfig.toml's [test] timeout is not read by bun test; VM tests boot kernels and build pools.
const TEST_TIMEOUT = ["--timeout", "120000"];

const color = process.stdout.isTTY ? { FORCE_COLOR: "1" } : {};

function banner(text: string): void {
  process.stderr.write(`\n=== ${text} ===\n`);
}

/** Stream a host command live and return its combined output. */
async function runHost(argv: string[]): Promise<{ output: string; exitCode: number | null }> {
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", stdin: "ignore", env: { ...process.env, ...color } });
  let output = "";
  const pump = async (s: ReadableStream<Uint8Array>, w: NodeJS.WriteStream) => {
    const dec = new TextDecoder();
    for await (const c of s) {
      w.write(c);
      output += dec.decode(c, { stream: true });
    }
  };
  await Promise.all([pump(p.stdout as ReadableStream<Uint8Array>, process.stdout), pump(p.stderr as ReadableStream<Uint8Array>, process.stderr)]);
  return { output, exitCode: await p.exited };
}

/** Line-buffered sink that prefixes each line (parallel VMs interleave by whole lines). */
function prefixed(prefix: string, w: NodeJS.WriteStream, collect: (s: string) => void) {
  const dec = new TextDecoder();
  let partial = "";
  return {
    sink: (c: Uint8Array) => {
      const text = dec.decode(c, { stream: true });
      collect(text);
      partial += text;
      const lines = partial.split("\n");
      partial = lines.pop() ?? "";
      if (lines.length) w.write(lines.map((l) => `${prefix}${l}\n`).join(""));
    },
    flush: () => {
      if (partial) w.write(`${prefix}${partial}\n`);
      partial = "";
    },
  };
}

async function runVmGroup(name: string, files: string[], mem: string, timeoutMs: number, filter: string[]): Promise<Totals> {
  let output = "";
  const collect = (s: string) => {
    output += s;
  };
  const out = prefixed(`[${name}] `, process.stdout, collect);
  const err = prefixed(`[${name}] `, process.stderr, collect);
  process.stderr.write(`[${name}] bun test ${[...filter, ...files].join(" ")}\n`);
  try {
    const kernelArgs = process.env.THINIMG_VM_KERNEL_ARGS?.split(/\s+/).filter(Boolean) ?? [];
    const r = await runInVm({ argv: ["bun", "test", ...TEST_TIMEOUT, ...filter, ...files], mem, timeoutMs, stdout: out.sink, stderr: err.sink, kernelArgs });
    out.flush();
    err.flush();
    if (r.timedOut) {
      process.stderr.write(`[${name}] VM timed out after ${Math.round(timeoutMs / 1000)} s (powered off)\n${tail(r.kernelLog, 15)}\n`);
      const c = countRun(output, null);
      return { pass: c.pass, fail: Math.max(c.fail, 1), failed: [...failedTestNames(output), `${name}: VM timed out`] };
    }
    return withNames(countRun(output, r.exitCode), output, name);
  } catch (e) {
    out.flush();
    err.flush();
    if (!(e instanceof ThinimgError)) throw e;
    process.stderr.write(`[${name}] error: ${e.oneLine()}\n`);
    if (e instanceof VmError) process.stderr.write(`[${name}] kernel log tail:\n${tail(e.kernelLog, 30)}\n`);
    return { pass: 0, fail: 1, failed: [`${name}: ${e.oneLine()}`] };
  }
}

/** Counts plus the failed tests' names; a failure bun did not name (crash, no summary) gets the run's label. */
function withNames(c: { pass: number; fail: number }, output: string, label: string): Totals {
  const failed = failedTestNames(output).map((n) => `${label}: ${n}`);
  if (c.fail > failed.length) failed.push(`${label}: run failed without naming a test (crash or no summary; see its output)`);
  return { ...c, failed };
}

function vmTestFiles(): string[] {
  try {
    return readdirSync("test/vm")
      .filter((f) => f.endsWith(".test.ts"))
      .sort()
      .map((f) => `test/vm/${f}`);
  } catch {
    return [];
  }
}

export const testCommand = defineCommand({
  meta: { name: "test", description: "Type-check, lint, host unit tests and VM tests; ends with 'N passed, N failed'" },
  args: {
    filters: { type: "positional", required: false, description: "unit | vm | check | lint | test file paths (default: everything)" },
    vms: { type: "string", description: "VMs to run test/vm files in, in parallel", default: "2" },
    mem: { type: "string", description: "Memory per VM", default: "1G" },
    timeout: { type: "string", description: "Limit per VM run (e.g. 1200, 20m)", default: "1200" },
    "test-name-pattern": {
      type: "string",
      alias: "t",
      description: "Run only the tests whose name matches this regex (bun test -t), e.g. one test of one file",
    },
  },
  async run({ args }) {
    let plan: ReturnType<typeof planRun>;
    try {
      plan = planRun(args._.map(String), vmTestFiles());
    } catch (e) {
      throw usageError((e as Error).message);
    }
    const vms = parseIntArg(args.vms, "--vms", { min: 1, max: 8 });
    const timeoutMs = parseDuration(args.timeout, "--timeout");
    const total: Totals = { pass: 0, fail: 0, failed: [] };
    const filter = args["test-name-pattern"] ? ["-t", args["test-name-pattern"]] : [];
    const t0 = performance.now();

    if (plan.check || plan.lint) {
      const jobs: [string, string[]][] = [];
      if (plan.check) jobs.push(["type-check (bun check)", ["bun", "check"]]);
      if (plan.lint) jobs.push(["lint and format (biome check)", ["node_modules/.bin/biome", "check", "lib", "scripts", "ops", "test"]]);
      for (const [label, argv] of jobs) {
        banner(label);
        const r = await runHost(argv);
        if (r.exitCode === 0) process.stderr.write(`${label}: ok\n`);
        else {
          process.stderr.write(`${label}: FAILED (exit ${r.exitCode})\n`);
          total.fail += 1;
          total.failed.push(label);
        }
      }
    }

    if (plan.unit.length) {
      banner(`host unit tests: bun test ${plan.unit.join(" ")}`);
      const r = await runHost(["bun", "test", ...TEST_TIMEOUT, ...filter, ...plan.unit]);
      const c = withNames(countRun(r.output, r.exitCode), r.output, "host");
      total.pass += c.pass;
      total.fail += c.fail;
      total.failed.push(...c.failed);
    }

    if (plan.vm.length) {
      const groups = splitFiles(plan.vm, vms);
      banner(`VM tests: ${plan.vm.length} file(s) in ${groups.length} VM(s)`);
      const results = await Promise.all(groups.map((files, i) => runVmGroup(`vm${i + 1}`, files, args.mem, timeoutMs, filter)));
      for (const c of results) {
        total.pass += c.pass;
        total.fail += c.fail;
        total.failed.push(...c.failed);
      }
    } else if (args._.length === 0) {
      process.stderr.write("no test/vm/*.test.ts files found\n");
    }

    process.stderr.write(`\n(${Math.round((performance.now() - t0) / 1000)} s)\n`);
    // Repeated last, on stdout, so a reader that only keeps the tail still sees what failed.
    if (total.failed.length) process.stdout.write(`failed:\n${total.failed.map((f) => `  - ${f}\n`).join("")}`);
    process.stdout.write(`${total.pass} passed, ${total.fail} failed\n`);
    process.exitCode = total.fail > 0 ? 1 : 0;
  },
});

if (import.meta.main) await runMain(testCommand);
