// Logging: human lines on stderr by default; JSON lines on stderr with --log-format json
// (or THINIMG_LOG_FORMAT=json). stdout is reserved for --json data.
import { type ConsolaInstance, type ConsolaReporter, createConsola, type LogObject } from "consola/core";

export type LogFormat = "human" | "json";

function jsonLine(obj: Pick<LogObject, "args" | "date" | "type">): void {
  const [first, ...rest] = obj.args;
  const rec: Record<string, unknown> = { ts: obj.date.toISOString(), level: obj.type };
  if (typeof first === "string") rec.msg = first;
  else if (first && typeof first === "object") Object.assign(rec, first);
  for (const extra of rest) {
    if (extra && typeof extra === "object" && !(extra instanceof Error)) Object.assign(rec, extra);
    else if (extra instanceof Error) rec.error = extra.message;
  }
  process.stderr.write(`${JSON.stringify(rec)}\n`);
}

function humanLine(obj: Pick<LogObject, "args" | "type">): void {
  const [first, ...rest] = obj.args;
  let line = typeof first === "string" ? first : JSON.stringify(first);
  for (const extra of rest) {
    if (extra && typeof extra === "object" && !(extra instanceof Error)) {
      line += ` ${Object.entries(extra as Record<string, unknown>)
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
        .join(" ")}`;
    } else line += ` ${String(extra)}`;
  }
  const tag = obj.type === "info" || obj.type === "log" || obj.type === "success" ? "" : `[${obj.type}] `;
  process.stderr.write(`${tag}${line}\n`);
}

const jsonReporter: ConsolaReporter = { log: jsonLine };
const humanReporter: ConsolaReporter = { log: humanLine };

function levelFromEnv(): number {
  const v = process.env.THINIMG_LOG_LEVEL;
  if (v === "debug") return 4;
  if (v === "warn") return 1;
  if (v === "error") return 0;
  if (v === "silent") return -999;
  return 3;
}

let format: LogFormat = process.env.THINIMG_LOG_FORMAT === "json" ? "json" : "human";
let level = levelFromEnv();
let instance: ConsolaInstance | undefined;

// Created on first use: consola's set-up (deep-merging its defaults) is a measurable part of a
// command's start in the VM, and most runs of a command log nothing.
function consola(): ConsolaInstance {
  instance ??= createConsola({ level, throttle: 0, reporters: [format === "json" ? jsonReporter : humanReporter] });
  return instance;
}

const LEVEL = { error: 0, warn: 1, info: 3, debug: 4 } as const;
type Args = [message?: unknown, ...rest: unknown[]];

export const log = {
  error: (...a: Args) => level >= LEVEL.error && consola().error(...a),
  warn: (...a: Args) => level >= LEVEL.warn && consola().warn(...a),
  info: (...a: Args) => level >= LEVEL.info && consola().info(...a),
  debug: (...a: Args) => level >= LEVEL.debug && consola().debug(...a),
  get level(): number {
    return level;
  },
  set level(l: number) {
    level = l;
    if (instance) instance.level = l;
  },
};

export function setLogFormat(f: LogFormat): void {
  format = f;
  instance?.setReporters([f === "json" ? jsonReporter : humanReporter]);
}

/** The per-command record (lib/exec.ts), by a policy of its own that a lowered log level does not
 * change (ADR-0001): a failed or timed-out command is always logged (warn); with the JSON format
 * every command is (info); human output shows successful commands only with --verbose (debug).
 * Only THINIMG_LOG_LEVEL=silent suppresses them all. */
export function logCommandRecord(rec: Record<string, unknown>, failed: boolean): void {
  if (log.level <= -999) return;
  const type = failed ? "warn" : "info";
  if (format === "json") jsonLine({ args: [rec], date: new Date(), type });
  else if (failed || log.level >= 4) humanLine({ args: [rec], type: failed ? "warn" : "debug" });
}

/** A state-changing command's before-record: shown with the JSON format only (human output would
 * print each command twice). */
export function logCommandStart(rec: Record<string, unknown>): void {
  if (log.level > -999 && format === "json") jsonLine({ args: [rec], date: new Date(), type: "info" });
}

export function setLogLevel(level: "debug" | "info" | "warn" | "error" | "silent"): void {
  log.level = { debug: 4, info: 3, warn: 1, error: 0, silent: -999 }[level];
}
