// bun scripts/gc.ts [--force] [--json] [--grace 10m] [--wait 30s] [--timeout 10s] [--ignore-lock] [--pool P] [--state-dir D]
// Find devices and thin ids that thinimg leaked (fail-dumb error paths, crashes, released snapshots,
// hand-made ids) and, with --force, remove them one bounded step at a time. Dry-run by default.
// Exit 0: all done (or, dry-run, nothing needs a human); 1: something failed or needs a human.
import { defineCommand } from "citty";
import { loadConfig } from "../../config.ts";
import { errorMessage, usageError } from "../../errors.ts";
import { writeLastGcRun } from "../../gc/last-run.ts";
import { DEFAULT_GRACE_MS } from "../../gc/plan.ts";
import { formatHuman } from "../../gc/report.ts";
import { runGc } from "../../gc/run.ts";
import { log } from "../../log.ts";
import { parseDuration } from "../../util/units.ts";
import { kernelWindowArgs, outputArgs, poolArgs, stateArgs } from "../args.ts";
import { printJson } from "../main.ts";

export const gcCommand = defineCommand({
  meta: {
    name: "gc",
    description:
      "List orphaned thinimg devices and thin ids (dry-run, the default) or remove them (--force). Skips anything mounted, open, suspended, foreign or younger than --grace.",
  },
  args: {
    force: { type: "boolean", description: "Act: unmount our own mounts, remove devices, delete thin ids", default: false },
    grace: { type: "string", description: "Leave orphans younger than this for the next run (e.g. 10m, 0)", default: "10m" },
    "ignore-lock": {
      type: "boolean",
      description: "Act even while unpacks, activations or releases run or another process holds the process lock (logged; health checks still apply)",
      default: false,
    },
    wait: {
      type: "string",
      description:
        "--force: how long to wait for running unpacks, activations and releases to finish before refusing (e.g. 0, 30s; env THINIMG_LOCK_WAIT; default 5m)",
    },
    timeout: {
      type: "string",
      description: "Limit for each operation, scans and health checks included (thin_ls of a very large pool may need more, e.g. 60s)",
      default: "10s",
    },
    ...kernelWindowArgs,
    ...poolArgs,
    ...stateArgs,
    ...outputArgs,
  },
  async run({ args }) {
    const cfg = loadConfig({ stateDir: args["state-dir"], pool: args.pool, wait: args.wait, kernelErrorWindow: args["kernel-error-window"] });
    const graceMs = args.grace === undefined ? DEFAULT_GRACE_MS : parseDuration(args.grace, "--grace");
    const stepTimeoutMs = parseDuration(args.timeout ?? "10s", "--timeout");
    if (stepTimeoutMs < 1000) throw usageError(`--timeout ${args.timeout} is below 1s: every scan and step would time out`);
    if (args["ignore-lock"] && !args.force) log.warn("--ignore-lock has no effect without --force");
    // SIGTERM/SIGINT (systemd stop, Ctrl-C): finish the current step, release what we hold, report
    const ac = new AbortController();
    const stop = (sig: string) => {
      if (ac.signal.aborted) return;
      log.warn(`gc: ${sig}: stopping after the current step`);
      ac.abort();
    };
    process.on("SIGTERM", () => stop("SIGTERM"));
    process.on("SIGINT", () => stop("SIGINT"));
    const report = await runGc({
      cfg,
      force: args.force,
      graceMs,
      ignoreLock: args["ignore-lock"],
      lockWaitMs: cfg.lockWaitMs,
      stepTimeoutMs,
      signal: ac.signal,
      command: `bun scripts/gc.ts${args.force ? " --force" : ""}`,
    });
    // the service's metrics export the last acting run (a dry-run changes nothing, not even this)
    if (args.force) {
      try {
        writeLastGcRun(cfg.stateDir, report);
      } catch (e) {
        log.warn(`could not record this run for the metrics: ${errorMessage(e)}`);
      }
    }
    // Bun.write resolves once everything is written: runMain's process.exit() right after must not
    // cut a large report short (process.stdout.write to a pipe is asynchronous)
    if (args.json) printJson(report, "gc");
    else await Bun.write(Bun.stdout, formatHuman(report));
    process.exitCode = report.exit_code;
  },
});

export default gcCommand;
