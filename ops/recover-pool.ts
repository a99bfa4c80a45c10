// Runbook: bring a loop-backed thin pool back after a reboot or panic, or create one.
//   bun ops/recover-pool.ts --create --dir DIR --data-size 2G --meta-size 64M [--block-size 64K] [--pool NAME]
//   bun ops/recover-pool.ts --dir DIR [--pool NAME] [--repair] [--dry-run] [--json] [--state-dir D] [--no-reattach]
//   bun ops/recover-pool.ts --dir DIR --grow-data SIZE|+SIZE [--grow-meta SIZE|+SIZE] [--dry-run]
// Once the pool is up, every snapshot the state DB holds as handed out gets its device back (the
// boot runbook's last step). The logic lives in lib/recover/ (boot.ts is this command's whole run);
// docs/ops-recover-pool.md is the operator's guide.
import { defineCommand } from "citty";
import { dryRunArgs, outputArgs, poolArgs, stateArgs } from "../lib/cli/args.ts";
import { printJson, runMain } from "../lib/cli/main.ts";
import { loadConfig } from "../lib/config.ts";
import { usageError } from "../lib/errors.ts";
import { setLogLevel } from "../lib/log.ts";
import { renderReattach } from "../lib/pipeline/reattach.ts";
import { recoverAndReattach } from "../lib/recover/boot.ts";
import { parseSizeArg } from "../lib/recover/grow.ts";
import type { CreateSpec } from "../lib/recover/record.ts";
import { renderReport } from "../lib/recover/report.ts";
import { parseIntArg, parseSize } from "../lib/util/units.ts";

export const cmd = defineCommand({
  meta: {
    name: "recover-pool",
    description: "Create a loop-backed thin pool, or bring one back from its record (DIR/pool.json) and re-attach its active snapshots — safe to re-run",
  },
  args: {
    dir: { type: "string", description: "Directory holding the pool's files and record (pool.json)", required: true },
    create: { type: "boolean", description: "Create a new pool in DIR (refuses to overwrite anything)", default: false },
    "data-size": { type: "string", description: "--create: data file size, e.g. 2G" },
    "meta-size": { type: "string", description: "--create: metadata file size, e.g. 64M (2M..16G)" },
    "block-size": { type: "string", description: "--create: pool block size, multiple of 64K (default 64K)" },
    repair: { type: "boolean", description: "If thin_check fails: thin_repair into a new metadata file (old one kept)", default: false },
    "grow-data": { type: "string", description: "Grow the data file and the pool to SIZE, or by +SIZE (never shrinks), e.g. +10G" },
    "grow-meta": { type: "string", description: "Grow the metadata file and the pool's metadata to SIZE, or by +SIZE (at most 16G), e.g. +64M" },
    "transaction-id": {
      type: "string",
      description: "--repair of a destroyed superblock: the pool's last transaction id (default: the one in the record)",
    },
    reattach: {
      type: "boolean",
      description: "Once the pool is up, re-attach every snapshot the state DB holds as active (--no-reattach skips it)",
      default: true,
    },
    wait: {
      type: "string",
      description: "How long to wait for running unpacks, activations and releases to finish before refusing (env THINIMG_LOCK_WAIT; default 5m)",
    },
    "ignore-lock": { type: "boolean", description: "Act even while other thinimg processes use the state dir (logged)", default: false },
    ...stateArgs,
    ...poolArgs,
    ...dryRunArgs,
    ...outputArgs,
  },
  async run({ args }) {
    // The step list is the narrative: other log lines wait for --verbose. Each command's record goes to
    // THINIMG_CMD_LOG and to stderr by its own policy (lib/log.ts logCommandRecord): failed or timed-out
    // commands always, every command with --log-format json, successful ones in human form with --verbose.
    if (!args.verbose && args["log-format"] !== "json" && !process.env.THINIMG_LOG_LEVEL) setLogLevel("error");
    if (!args.dir) throw usageError("--dir must not be empty");
    const grow =
      args["grow-data"] !== undefined || args["grow-meta"] !== undefined
        ? {
            data: args["grow-data"] !== undefined ? parseSizeArg(args["grow-data"], "--grow-data") : undefined,
            meta: args["grow-meta"] !== undefined ? parseSizeArg(args["grow-meta"], "--grow-meta") : undefined,
          }
        : undefined;
    if (grow && (args.create || args.repair)) throw usageError(`--grow-data/--grow-meta cannot be combined with --${args.create ? "create" : "repair"}`);
    if (args["transaction-id"] !== undefined && !args.repair) throw usageError("--transaction-id only applies with --repair");
    const transactionId =
      args["transaction-id"] === undefined ? undefined : parseIntArg(args["transaction-id"], "--transaction-id", { min: 0, max: 2 ** 53 - 1 });
    const r = await recoverAndReattach({
      transactionId,
      dir: args.dir,
      pool: args.pool || undefined,
      dryRun: args["dry-run"],
      repair: args.repair,
      create: createSpec(args),
      cfg: loadConfig({ stateDir: args["state-dir"], wait: args.wait }),
      ignoreLock: args["ignore-lock"],
      reattach: args.reattach,
      grow,
    });
    if (args.json) printJson({ ...r.report, ok: r.exitCode === 0, reattach: r.reattach }, "recover-pool");
    const text = renderReport(r.report);
    process.stderr.write([...r.warnings, ...text.stderr, ...(r.reattach ? renderReattach(r.reattach) : [])].map((l) => `${l}\n`).join(""));
    if (!args.json && text.stdout.length) process.stdout.write(text.stdout.map((l) => `${l}\n`).join(""));
    process.exitCode = r.exitCode;
  },
});

type SizeFlags = { create: boolean; repair: boolean; "data-size"?: string | undefined; "meta-size"?: string | undefined; "block-size"?: string | undefined };

/** --create's sizes, or undefined (refusing the size flags without --create). */
function createSpec(args: SizeFlags): CreateSpec | undefined {
  const createOnly = (["data-size", "meta-size", "block-size"] as const).filter((k) => args[k] !== undefined);
  if (!args.create) {
    if (createOnly.length) throw usageError(`--${createOnly[0]} only applies with --create`, "a pool is brought back with the sizes in its record");
    return undefined;
  }
  if (args.repair) throw usageError("--repair cannot be combined with --create");
  if (!args["data-size"] || !args["meta-size"])
    throw usageError("--create needs --data-size and --meta-size", "e.g. --create --dir /var/lib/thinimg/pool --data-size 2G --meta-size 64M");
  return {
    dataSize: parseSize(args["data-size"], "--data-size"),
    metaSize: parseSize(args["meta-size"], "--meta-size"),
    blockSize: args["block-size"] ? parseSize(args["block-size"], "--block-size") : undefined,
  };
}

if (import.meta.main) await runMain(cmd);
