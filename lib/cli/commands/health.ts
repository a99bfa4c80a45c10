// bun scripts/health.ts [--pool NAME] [--json] [--ack] [--kernel-error-window 15m]
//                       [--data-warn 80 --data-block 95 --meta-warn 75 --meta-block 90]
// The pre-flight health checks as a command: exit 0 healthy (warnings allowed), 1 blocked, with the
// reason and the runbook step. --ack first acknowledges the kernel errors checks have recorded (logged
// with who and when), then checks. docs/ops-health.md explains every check.
import { defineCommand } from "citty";
import { loadConfig } from "../../config.ts";
import { usageError } from "../../errors.ts";
import { type CheckResult, DEFAULT_THRESHOLDS, reportJson, runHealthChecks, type Thresholds, thresholdsJson } from "../../health/index.ts";
import { acknowledgeFindings, whoAmI } from "../../health/kernel-findings.ts";
import { log, setLogLevel } from "../../log.ts";
import { parseDuration, parseIntArg } from "../../util/units.ts";
import { kernelWindowArgs, outputArgs, poolArgs, stateArgs } from "../args.ts";
import { printJson } from "../main.ts";

const pctArg = (description: string, dflt: number) => ({ type: "string", description: `${description} (default ${dflt})` }) as const;

const MARK: Record<CheckResult["status"], string> = { ok: "ok   ", warn: "WARN ", block: "BLOCK" };

interface ShownFinding {
  line: string;
  age_s: number;
  acknowledged: boolean;
  acknowledged_by: string | null;
}

/** Under host.dmesg: each kernel error still inside the window, with its age and acknowledgement. */
function findingLines(c: CheckResult): string[] {
  const fs = (c.details?.findings ?? []) as ShownFinding[];
  return fs.map((f) => `${" ".repeat(25)}${f.acknowledged ? `acknowledged by ${f.acknowledged_by}` : "NOT acknowledged"}, ${f.age_s} s old: ${f.line}`);
}

export const healthCommand = defineCommand({
  meta: { name: "health", description: "Pre-flight health checks of the thin pool and the host; exit 0 healthy, 1 blocked" },
  args: {
    ...poolArgs,
    ...stateArgs,
    "host-only": { type: "boolean", description: "Skip the pool checks (host checks only)", default: false },
    ack: {
      type: "boolean",
      description: "Acknowledge the kernel errors the checks have shown (they stop blocking dm work; logged with who and when), then check",
      default: false,
    },
    ...kernelWindowArgs,
    "data-warn": pctArg("Warn when pool data use reaches this percent", DEFAULT_THRESHOLDS.dataWarnPct),
    "data-block": pctArg("Block when pool data use reaches this percent", DEFAULT_THRESHOLDS.dataBlockPct),
    "meta-warn": pctArg("Warn when pool metadata use reaches this percent", DEFAULT_THRESHOLDS.metaWarnPct),
    "meta-block": pctArg("Block when pool metadata use reaches this percent", DEFAULT_THRESHOLDS.metaBlockPct),
    timeout: { type: "string", description: "Limit per check (e.g. 10s); a check past it blocks", default: "10s" },
    ...outputArgs,
  },
  async run({ args }) {
    // The report is the narrative: other log lines wait for --verbose. Command records keep their own
    // policy (lib/log.ts logCommandRecord): a failed command is always logged, every one with JSON logs.
    if (!args.verbose && args["log-format"] !== "json" && !process.env.THINIMG_LOG_LEVEL) setLogLevel("error");
    const cfg = loadConfig({ pool: args.pool, stateDir: args["state-dir"], kernelErrorWindow: args["kernel-error-window"] });
    const th: Partial<Thresholds> = {};
    const pct = (flag: keyof typeof args & string, key: keyof Thresholds) => {
      const v = args[flag];
      if (typeof v === "string") th[key] = parseIntArg(v, `--${flag}`, { min: 0, max: 100 });
    };
    pct("data-warn", "dataWarnPct");
    pct("data-block", "dataBlockPct");
    pct("meta-warn", "metaWarnPct");
    pct("meta-block", "metaBlockPct");
    const eff = { ...DEFAULT_THRESHOLDS, ...th };
    if (eff.dataWarnPct > eff.dataBlockPct) throw usageError(`--data-warn ${eff.dataWarnPct} is above --data-block ${eff.dataBlockPct}`);
    if (eff.metaWarnPct > eff.metaBlockPct) throw usageError(`--meta-warn ${eff.metaWarnPct} is above --meta-block ${eff.metaBlockPct}`);
    const timeoutMs = parseDuration(args.timeout, "--timeout");
    if (timeoutMs < 100) throw usageError("--timeout must be at least 100ms");

    let acknowledged: { seq: number; boot_id: string; what: string; line: string }[] = [];
    if (args.ack) {
      const by = whoAmI();
      acknowledged = (await acknowledgeFindings(cfg.stateDir, { by })).map(({ boot_id, seq, what, line }) => ({ boot_id, seq, what, line }));
      // a warning, so it lands in the journal whatever the report's verbosity
      for (const f of acknowledged) log.warn(`health: kernel error acknowledged by ${by}: ${f.line}`);
      process.stderr.write(
        acknowledged.length
          ? `acknowledged ${acknowledged.length} kernel error(s) as ${by} (logged in ${cfg.stateDir}/health-ack.log)\n`
          : "nothing to acknowledge: no check has recorded an unacknowledged kernel error\n",
      );
    }
    const report = await runHealthChecks({
      pool: args["host-only"] ? null : cfg.pool,
      thresholds: th,
      stateDir: cfg.stateDir,
      timeoutMs,
      kernelErrorWindowMs: cfg.kernelErrorWindowMs,
    });
    const blocking = report.checks.filter((c) => c.status === "block");
    if (args.json) {
      printJson({ ok: report.healthy, ...reportJson(report), thresholds: thresholdsJson(eff), ...(args.ack ? { acknowledged } : {}) }, "health");
    } else {
      const lines = report.checks.flatMap((c) => [`${MARK[c.status]} ${c.name.padEnd(18)} ${c.message}`, ...findingLines(c)]);
      lines.push(`${report.healthy ? "healthy" : "BLOCKED"}${report.pool ? ` (pool ${report.pool})` : " (host only)"} in ${Math.round(report.durationMs)} ms`);
      process.stdout.write(`${lines.join("\n")}\n`);
    }
    for (const c of report.checks) {
      if (c.status === "warn") process.stderr.write(`warning: ${c.name}: ${c.message} — ${c.runbook}\n`);
    }
    for (const c of blocking) process.stderr.write(`blocked: ${c.name}: ${c.message} — next step: ${c.runbook}\n`);
    process.exitCode = report.healthy ? 0 : 1;
  },
});

export default healthCommand;
