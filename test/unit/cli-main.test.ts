import { afterAll, describe, expect, test } from "bun:test";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { outputProblems } from "../../lib/cli/schemas.ts";
import { errorEnvelope, ThinimgError } from "../../lib/errors.ts";
import { classifyKernelLine } from "../../lib/health/dmesg.ts";
import { TOOL_PACKAGES } from "../../lib/recover/recover.ts";
import { run } from "../helpers/run.ts";

describe("runMain", () => {
  test("large --json output through a pipe arrives whole before exit", async () => {
    const p = Bun.spawn(["bun", join(import.meta.dir, "../helpers/big-json-cli.ts")], { stdout: "pipe", stderr: "pipe" });
    const out = await new Response(p.stdout).text();
    expect(await p.exited).toBe(0);
    expect(out.length).toBeGreaterThan(700_000); // far past a pipe buffer (64 KiB)
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
  return run(["bun", file, ...args]);
}

describe("terminal or not", () => {
  test("--version prints the version and acts on nothing (even with --force)", async () => {
    const { code, out } = await cli(`await runMain(defineCommand({ args: { force: { type: "boolean" } }, run() { console.log("ACTED"); } }));`, [
      "--force",
      "--version",
    ]);
    expect(code).toBe(0);
    expect(out).toMatch(/^thinimg \d+\.\d+\.\d+\n$/);
  });

  test("piped: help without colour codes, --json on one line", async () => {
    const help = Bun.spawnSync(["bun", join(import.meta.dir, "../../scripts/gc.ts"), "--help"], { stdout: "pipe" });
    expect(help.stdout.toString()).toContain("USAGE");
    expect(help.stdout.toString()).not.toContain("\u001b[");
    const { out } = await cli(`import { printJson } from "${MAIN}"; await runMain(defineCommand({ run() { printJson({ a: 1, b: { c: [1, 2] } }); } }));`, []);
    expect(out).toBe('{"a":1,"b":{"c":[1,2]}}\n');
  });
});

describe("--json schemas", () => {
  test("a document that drifted from its command's schema fails the command (exit 70), never reaching stdout", async () => {
    const body = `import { printJson } from "${MAIN}";
      await runMain(defineCommand({ run() { printJson({ ok: true, snapshot_id: 1, image: "web", thin_id: 2, device_name: "d", devicePath: "/dev/mapper/d", duration_ms: 1 }, "activate"); } }));`;
    const { code, out, err } = await cli(body, []);
    expect(code).toBe(70);
    expect(out).toBe("");
    expect(err).toContain("the JSON output of activate does not match its schema");
  });

  test("every error is the one envelope; a matching document passes", () => {
    const e = errorEnvelope(new ThinimgError("input", "bad", { hint: "fix it", details: { offset: 512 } }));
    expect(outputProblems("error", e)).toBeNull();
    expect(outputProblems("release", { ok: true, snapshot_id: 3, device_name: null, state: "released", duration_ms: 2 })).toBeNull();
    expect(outputProblems("release", { ok: true, snapshotId: 3, device_name: null, state: "released", duration_ms: 2 })).toContain("snapshot_id");
  });
});

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
    const recs = err
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l))
      .filter((r) => r.event === "cmd");
    expect(recs.length).toBeGreaterThanOrEqual(1);
    expect(recs[0].command).toMatch(/^dmsetup .*version$/);
    expect(Object.keys(recs[0]).sort()).toEqual([
      "command",
      "device_id",
      "device_name",
      "duration_ms",
      "event",
      "exit_code",
      "level",
      "pool_name",
      "started_at",
      "timed_out",
      "ts",
    ]);
  });
});

describe("stray positional words", () => {
  const script = (name: string) => join(import.meta.dir, "../..", name);
  async function runScript(args: string[]): Promise<{ code: number; err: string }> {
    const p = Bun.spawn(["bun", ...args], { stdout: "pipe", stderr: "pipe", cwd: join(import.meta.dir, "../..") });
    const [err, code] = await Promise.all([new Response(p.stderr).text(), p.exited]);
    return { code, err };
  }

  test("health.ts --host-only stray and recover-pool --dir X create are refused: one line, exit 2, nothing run", async () => {
    const h = await runScript([script("scripts/health.ts"), "--host-only", "stray"]);
    expect([h.code, h.err]).toEqual([2, 'error: unexpected argument "stray": this command takes no positional arguments — see --help\n']);
    const r = await runScript([script("ops/recover-pool.ts"), "--dir", join(tmp, "rp"), "create"]);
    expect([r.code, r.err]).toEqual([2, 'error: unexpected argument "create": this command takes no positional arguments — see --help\n']);
  });

  const body = (args: string) => `await runMain(defineCommand({ args: ${args}, run({ args }) { console.log(JSON.stringify(args._)); } }));`;
  const twoPositionals = body(
    `{ source: { type: "positional", required: true }, dest: { type: "positional", required: true }, name: { type: "string" }, n: { type: "string", alias: "N" }, json: { type: "boolean" } }`,
  );

  test("defined positionals pass; flag values (--name v, -N v, --name=v) are not counted; one word more is refused", async () => {
    expect(await cli(twoPositionals, ["a", "--name", "x", "b", "--json"])).toMatchObject({ code: 0, out: '["a","b"]\n' });
    expect(await cli(twoPositionals, ["--name=x", "a", "-N", "3", "b"])).toMatchObject({ code: 0, out: '["a","b"]\n' });
    const extra = await cli(twoPositionals, ["a", "b", "c"]);
    expect([extra.code, extra.err]).toEqual([2, 'error: unexpected argument "c": this command takes SOURCE DEST — see --help\n']);
    expect((await cli(twoPositionals, ["a", "b", "--", "c"])).code).toBe(2);
    // a boolean takes no value: the word after it is positional
    expect((await cli(twoPositionals, ["a", "--json", "b", "c"])).code).toBe(2);
  });

  test("an optional last positional (test filters) takes any number of words", async () => {
    const filters = body(`{ filters: { type: "positional", required: false }, vms: { type: "string" } }`);
    expect(await cli(filters, ["unit", "--vms", "1", "test/a.ts", "test/b.ts"])).toMatchObject({ code: 0, out: '["unit","test/a.ts","test/b.ts"]\n' });
  });
});

describe("flags that take a value", () => {
  const cmd = `await runMain(defineCommand({ args: { name: { type: "string" }, n: { type: "string", alias: "N" }, json: { type: "boolean", alias: "j" } }, run({ args }) { console.log(JSON.stringify([args.name ?? null, args.n ?? null])); } }));`;

  test("a value-taking flag with no value, an empty one, or another flag where its value should be is refused: one line, exit 2", async () => {
    const cases: [string[], string][] = [
      [["--name"], "error: --name needs a value — write --name VALUE or --name=VALUE; see --help\n"],
      [["--name="], "error: --name= has an empty value — write --name=VALUE or --name VALUE\n"],
      [["--name", "-N", "3"], "error: --name needs a value (found -N where it should be) — write --name VALUE or --name=VALUE; see --help\n"],
      [["-N"], "error: -N needs a value — write -N VALUE; see --help\n"],
      // the last letter of a short cluster takes the next word
      [["-jN"], "error: -N needs a value — write -N VALUE; see --help\n"],
    ];
    for (const [args, err] of cases) {
      const r = await cli(cmd, args);
      expect([args, r.code, r.err, r.out]).toEqual([args, 2, err, ""]);
    }
    // with --json the same error is also the JSON envelope on stdout
    const j = await cli(cmd, ["--json", "--name"]);
    expect([j.code, JSON.parse(j.out)]).toEqual([
      2,
      { ok: false, error: { kind: "usage", message: "--name needs a value", hint: "write --name VALUE or --name=VALUE; see --help" } },
    ]);
  });

  test("values that start with a dash but are not flags pass: a negative number, a lone -", async () => {
    expect(await cli(cmd, ["--name", "-", "-N", "-5", "--json"])).toMatchObject({ code: 0, out: '["-","-5"]\n' });
    expect(await cli(cmd, ["--name=--odd"])).toMatchObject({ code: 0, out: '["--odd",null]\n' });
    expect(await cli(cmd, ["-jN", "7"])).toMatchObject({ code: 0, out: '[null,"7"]\n' });
  });
});

describe("a state dir nothing was unpacked with", () => {
  const ROOT = join(import.meta.dir, "../..");
  const script = (name: string, args: string[]) => run(["bun", join(ROOT, "scripts", name), ...args], { cwd: ROOT });

  test("activate, release, remove and prune refuse it in one line (exit 7) and create nothing there", async () => {
    for (const [name, args] of [
      ["activate.ts", ["img"]],
      ["release.ts", ["1"]],
      ["remove.ts", ["img"]],
      ["prune.ts", ["--keep-last", "2"]],
    ] as const) {
      const dir = join(tmp, `typo-${name}`);
      const r = await script(name, [...args, "--state-dir", dir]);
      expect([name, r.code, r.err]).toEqual([
        name,
        7,
        `error: no thinimg state in ${dir} (no state.db there) — pass the state dir the images were unpacked with (--state-dir or THINIMG_STATE_DIR); \`bun scripts/unpack.ts\` creates one\n`,
      ]);
      expect(existsSync(dir)).toBe(false);
    }
  });

  test("unpack names a SOURCE that cannot be one before it checks the host (here: no device-mapper at all)", async () => {
    const dir = join(tmp, "unpack-bad-source");
    const missing = await script("unpack.ts", [join(tmp, "no-such-image"), "--name", "a", "--state-dir", dir]);
    expect([missing.code, missing.err.split(" — ")[0]]).toEqual([3, `error: ${join(tmp, "no-such-image")}: no such file or directory`]);
    const bucket = await script("unpack.ts", ["s3://", "--name", "a", "--state-dir", dir]);
    expect([bucket.code, bucket.err]).toEqual([2, 'error: "" is not an S3 bucket name — use s3://BUCKET/KEY or s3://BUCKET/PREFIX/\n']);
  });

  test("remove with no image and prune with no rule are usage errors (exit 2) before the state dir is looked at", async () => {
    const dir = join(tmp, "typo-usage");
    expect((await script("remove.ts", ["--state-dir", dir])).err).toStartWith("error: no image given");
    expect((await script("prune.ts", ["--state-dir", dir])).err).toStartWith("error: prune needs --unused-for and/or --keep-last");
    expect(existsSync(dir)).toBe(false);
  });

  test("a state dir this user cannot read is not taken for a missing one", async () => {
    const dir = join(tmp, "unreadable");
    mkdirSync(dir, { mode: 0o700 });
    writeFileSync(join(dir, "state.db"), "");
    const asNobody = (name: string, args: string[]) =>
      run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bun", join(ROOT, "scripts", name), ...args], { cwd: "/" });
    const l = await asNobody("list.ts", ["--no-space", "--state-dir", dir]);
    expect([l.code, l.err]).toEqual([3, expect.stringContaining(`cannot open state database ${join(dir, "state.db")}`)]);
    const r = await asNobody("release.ts", ["1", "--state-dir", dir]);
    expect([r.code, r.err]).toEqual([3, expect.stringContaining("cannot open state database")]);
  });

  test("prune --unused-for with a bare number (seconds, never what was meant) is refused before anything is opened", async () => {
    const dir = join(tmp, "prune-bare");
    const r = await script("prune.ts", ["--unused-for", "7", "--state-dir", dir]);
    expect([r.code, r.err]).toEqual([2, 'error: --unused-for: "7" has no unit — write e.g. 7d or 7h (a bare number would be seconds)\n']);
    expect(existsSync(dir)).toBe(false);
  });

  test("list shows it empty, says why on stderr, and creates nothing there", async () => {
    const dir = join(tmp, "typo-list");
    const r = await script("list.ts", ["--no-space", "--json", "--state-dir", dir]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.out)).toMatchObject({ ok: true, images: [], layers: [], snapshots: [], thin_ids: {} });
    expect(r.err).toContain(`no thinimg state in ${dir} (no state.db there)`);
    expect(existsSync(dir)).toBe(false);
  });
});

describe("set-up and CI", () => {
  const ROOT = join(import.meta.dir, "../..");

  test("scripts/setup.sh installs the package of every tool thinimg runs (dmsetup directly, not by luck)", () => {
    const text = readFileSync(join(ROOT, "scripts/setup.sh"), "utf8");
    const pkgs = /^PKGS=\(([^)]*)\)/m.exec(text)![1]!.split(/\s+/).filter(Boolean);
    for (const pkg of new Set([...Object.values(TOOL_PACKAGES), "dmsetup", "e2fsprogs", "util-linux"])) expect(pkgs).toContain(pkg);
  });

  /** .ci/run in a scratch tree whose scripts/setup.sh exits `setupRc` and whose `bun` prints a summary. */
  async function ciRun(setupRc: number): Promise<{ code: number; out: string }> {
    const t = mkdtempSync(join(tmp, "ci-"));
    mkdirSync(join(t, ".ci"));
    mkdirSync(join(t, "scripts"));
    mkdirSync(join(t, "bin"));
    copyFileSync(join(ROOT, ".ci/run"), join(t, ".ci/run"));
    writeFileSync(join(t, "scripts/setup.sh"), `echo setup output; exit ${setupRc}\n`);
    writeFileSync(join(t, "bin/bun"), `#!/bin/sh\necho "ran: bun $*"; echo "7 passed, 2 failed"; exit 1\n`, { mode: 0o755 });
    const p = Bun.spawn(["bash", join(t, ".ci/run")], {
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, PATH: `${join(t, "bin")}:${process.env.PATH}` },
    });
    const [out, code] = await Promise.all([new Response(p.stdout).text(), p.exited]);
    return { code, out };
  }

  test(".ci/run: a failed set-up still ends with the summary line, counted as one failure", async () => {
    const r = await ciRun(1);
    expect(r.code).toBe(1);
    expect(r.out.trim().split("\n").at(-1)).toBe("0 passed, 1 failed");
    expect(r.out).not.toContain("ran: bun");
  });

  test(".ci/run: after a good set-up the summary is the test command's own", async () => {
    const r = await ciRun(0);
    expect(r.code).toBe(1);
    expect(r.out.trim().split("\n").slice(-2)).toEqual(["ran: bun run test", "7 passed, 2 failed"]);
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
