// Runtime configuration: flags win over environment variables, which win over defaults. Every value
// is parsed (sizes, durations) and then validated with valibot; a bad value becomes ONE line naming
// where it came from (flag or env var), what is wrong and what to use instead.
import { isAbsolute, join, resolve } from "node:path";
import * as v from "valibot";
import { quoted, ThinimgError } from "./errors.ts";
import { log } from "./log.ts";
import { parseDuration, parseIntArg, parseSize } from "./util/units.ts";

export const DEFAULT_STATE_DIR = "/var/lib/thinimg";
export const DEFAULT_POOL = "thinimg-pool";
/** Every dm device thinimg creates starts with this; devices without it are never touched. */
export const DEVICE_PREFIX = "thinimg";
export const DEFAULT_VIRTUAL_SIZE = 10 * 1024 ** 3;
export const DEFAULT_LOCK_WAIT_MS = 5 * 60_000;
/** A device-mapper/I/O error in the kernel log blocks dm work until it is this old (or acknowledged). */
export const DEFAULT_KERNEL_ERROR_WINDOW_MS = 15 * 60_000;

/** Longest suffix a device name gets: "-layer-16777215" / "-snap-16777215". */
const LONGEST_SUFFIX = "-layer-16777215".length;
const MAX_POOL_NAME = 127 - DEVICE_PREFIX.length - 1 - LONGEST_SUFFIX;

export interface Limits {
  /** Largest blob (compressed, as stored) fetched into the cache. */
  maxBlobBytes: number;
  /** Uncompressed bytes of one layer (also the decompression bomb guard). */
  maxLayerBytes: number;
  maxFileBytes: number;
  maxEntries: number;
  /** Path components of an entry or of what a link resolves to; longest name or link target. */
  maxDepth: number;
  maxPathBytes: number;
}

export interface Config {
  stateDir: string;
  dbPath: string;
  lockFile: string;
  /** Mount points for layer application live here, one per device. */
  mountDir: string;
  pool: string;
  prefix: string;
  /** Virtual size of a new base layer device (every layer and snapshot of it inherits it). */
  virtualSize: number;
  /** How long a second caller waits for a lock before giving up. */
  lockWaitMs: number;
  /** A kernel error blocks dm work until it is this old or an operator acknowledged it. */
  kernelErrorWindowMs: number;
  limits: Limits;
}

export interface ConfigInput {
  stateDir?: string | undefined;
  pool?: string | undefined;
  virtualSize?: string | undefined;
  wait?: string | undefined;
  kernelErrorWindow?: string | undefined;
  /** The image limits (--max-entries, --max-bytes, …; lib/cli/args.ts limitArgs). */
  maxEntries?: string | undefined;
  maxBytes?: string | undefined;
  maxFileSize?: string | undefined;
  maxBlobSize?: string | undefined;
  maxDepth?: string | undefined;
  maxPathBytes?: string | undefined;
}

type Env = Record<string, string | undefined>;

const GiB = 1024 ** 3;

const Schema = v.object({
  stateDir: v.pipe(
    v.string(),
    v.check((s) => isAbsolute(s), "must be an absolute path"),
    v.check((s) => !/[\0-\x1f]/.test(s), "must not contain control characters"),
  ),
  pool: v.pipe(
    v.string(),
    v.regex(/^[A-Za-z0-9][A-Za-z0-9._+-]*$/, "use letters, digits and . _ + - (starting with a letter or digit)"),
    v.maxLength(MAX_POOL_NAME, `must be at most ${MAX_POOL_NAME} characters (device names carry it)`),
  ),
  virtualSize: v.pipe(
    v.number(),
    v.integer(),
    v.minValue(64 * 1024 ** 2, "must be at least 64M (ext4 needs room for its journal)"),
    v.maxValue(16 * 1024 ** 4, "must be at most 16T"),
    v.check((n) => n % 4096 === 0, "must be a multiple of 4K"),
  ),
  lockWaitMs: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(24 * 3_600_000, "must be at most 24h")),
  kernelErrorWindowMs: v.pipe(v.number(), v.integer(), v.minValue(0), v.maxValue(24 * 3_600_000, "must be at most 24h")),
  limits: v.object({
    maxBlobBytes: v.pipe(v.number(), v.integer(), v.minValue(1)),
    maxLayerBytes: v.pipe(v.number(), v.integer(), v.minValue(1)),
    maxFileBytes: v.pipe(v.number(), v.integer(), v.minValue(1)),
    maxEntries: v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(100_000_000)),
    maxDepth: v.pipe(v.number(), v.integer(), v.minValue(1)),
    maxPathBytes: v.pipe(v.number(), v.integer(), v.minValue(1)),
  }),
});

/** Where each field came from, so an error can name the flag or the variable. */
type Sources = Record<string, string>;

function pick(flag: string | undefined, flagName: string, env: Env, envName: string, sources: Sources, key: string) {
  if (flag !== undefined && flag !== "") {
    sources[key] = flagName;
    return flag;
  }
  const e = env[envName];
  if (e !== undefined && e !== "") {
    sources[key] = envName;
    return e;
  }
  sources[key] = `default ${key}`;
  return undefined;
}

/** Build and validate the configuration. Throws ThinimgError("usage") with one line on bad input. */
export function loadConfig(input: ConfigInput = {}, env: Env = process.env): Config {
  const src: Sources = {};
  const stateRaw = pick(input.stateDir, "--state-dir", env, "THINIMG_STATE_DIR", src, "stateDir");
  const poolRaw = pick(input.pool, "--pool", env, "THINIMG_POOL", src, "pool");
  const sizeRaw = pick(input.virtualSize, "--virtual-size", env, "THINIMG_VIRTUAL_SIZE", src, "virtualSize");
  const waitRaw = pick(input.wait, "--wait", env, "THINIMG_LOCK_WAIT", src, "lockWaitMs");
  const windowRaw = pick(input.kernelErrorWindow, "--kernel-error-window", env, "THINIMG_KERNEL_ERROR_WINDOW", src, "kernelErrorWindowMs");
  const limit = (flag: string | undefined, flagName: string, envName: string, key: string, parse: (raw: string, what: string) => number, dflt: number) => {
    const raw = pick(flag, flagName, env, envName, src, `limits.${key}`);
    return raw === undefined ? dflt : parse(raw, src[`limits.${key}`]!);
  };
  const count = (raw: string, what: string) => parseIntArg(raw, what, { min: 1 });
  const raw = {
    stateDir: stateRaw === undefined ? DEFAULT_STATE_DIR : resolve(stateRaw),
    pool: poolRaw ?? DEFAULT_POOL,
    virtualSize: sizeRaw === undefined ? DEFAULT_VIRTUAL_SIZE : parseSize(sizeRaw, src.virtualSize!),
    lockWaitMs: waitRaw === undefined ? DEFAULT_LOCK_WAIT_MS : parseDuration(waitRaw, src.lockWaitMs!),
    kernelErrorWindowMs: windowRaw === undefined ? DEFAULT_KERNEL_ERROR_WINDOW_MS : parseDuration(windowRaw, src.kernelErrorWindowMs!),
    limits: {
      maxBlobBytes: limit(input.maxBlobSize, "--max-blob-size", "THINIMG_MAX_BLOB_SIZE", "maxBlobBytes", parseSize, 8 * GiB),
      maxLayerBytes: limit(input.maxBytes, "--max-bytes", "THINIMG_MAX_LAYER_SIZE", "maxLayerBytes", parseSize, 10 * GiB),
      maxFileBytes: limit(input.maxFileSize, "--max-file-size", "THINIMG_MAX_FILE_SIZE", "maxFileBytes", parseSize, GiB),
      maxEntries: limit(input.maxEntries, "--max-entries", "THINIMG_MAX_ENTRIES", "maxEntries", count, 100_000),
      maxDepth: limit(input.maxDepth, "--max-depth", "THINIMG_MAX_DEPTH", "maxDepth", count, 1024),
      maxPathBytes: limit(input.maxPathBytes, "--max-path-bytes", "THINIMG_MAX_PATH_BYTES", "maxPathBytes", count, 4096),
    },
  };
  const r = v.safeParse(Schema, raw);
  if (!r.success) {
    const issue = r.issues[0];
    const path = v.getDotPath(issue) ?? "config";
    const where = src[path] ?? path;
    const shown = JSON.stringify(issue.input) ?? String(issue.input);
    const value = shown.length > 60 ? `${shown.slice(0, 57)}…"` : shown;
    throw new ThinimgError("usage", `${where} ${value}: ${issue.message}`, {
      hint: hintFor(path, where),
    });
  }
  for (const name of Object.keys(ENV_DURATION_MIN_MS) as EnvDuration[]) envDuration(name, 0, env);
  for (const [name, choices] of Object.entries(ENV_CHOICES)) {
    const raw = env[name];
    if (raw && !choices.includes(raw)) log.warn(`${name} ${quoted(raw)} is not one of ${choices.join(", ")}: ignored (set one of them, or unset it)`);
  }
  const c = r.output;
  return {
    ...c,
    prefix: DEVICE_PREFIX,
    dbPath: join(c.stateDir, "state.db"),
    lockFile: join(c.stateDir, "thinimg.lock"),
    mountDir: join(c.stateDir, "mnt"),
  };
}

/** Logging settings (lib/log.ts reads them before any config): a typo is said on every command, not
 * refused (a logging setting never stops GC or an unpack), and not ignored silently. */
const ENV_CHOICES: Record<string, readonly string[]> = {
  THINIMG_LOG_FORMAT: ["human", "json"],
  THINIMG_LOG_LEVEL: ["debug", "info", "warn", "error", "silent"],
};

/** Durations set only in the environment, read where they are used (the host dm queue's wait, the
 * tools' timeouts), each with its least sensible value: a 0 s mkfs timeout would fail every layer,
 * and a timed-out command is never retried. loadConfig checks them all, so a bad value stops a
 * command before it starts, not an unpack at its first dm command. */
const ENV_DURATION_MIN_MS = {
  THINIMG_DM_QUEUE_WAIT: 0,
  THINIMG_TIMEOUT_MKFS: 1000,
  THINIMG_TIMEOUT_MOUNT: 1000,
  THINIMG_TIMEOUT_UMOUNT: 1000,
} as const;
export type EnvDuration = keyof typeof ENV_DURATION_MIN_MS;

export function envDuration(name: EnvDuration, dfltMs: number, env: Env = process.env): number {
  const raw = env[name];
  if (!raw) return dfltMs;
  const ms = parseDuration(raw, name);
  if (ms < ENV_DURATION_MIN_MS[name])
    throw new ThinimgError("usage", `${name} ${raw}: below ${ENV_DURATION_MIN_MS[name] / 1000}s`, {
      hint: `set ${name} to e.g. 30s, or unset it for the default`,
    });
  return ms;
}

/** A pool name given outside loadConfig (recover-pool --create's flag, named by `where`), checked by the same rule. */
export function checkPoolName(name: string, where: string): string {
  const r = v.safeParse(Schema.entries.pool, name);
  if (r.success) return r.output;
  throw new ThinimgError("usage", `${where} ${JSON.stringify(name)}: ${r.issues[0].message}`, { hint: hintFor("pool", where) });
}

/** The next step for a bad value, naming where it came from (the command's flag, or the variable:
 * a command without that flag only reads the variable). */
function hintFor(path: string, where: string): string {
  const example: Record<string, string> = {
    stateDir: "/abs/path",
    pool: "NAME",
    virtualSize: "10G",
    lockWaitMs: "30s",
    kernelErrorWindowMs: "15m (0: a kernel error blocks only the check that first sees it)",
  };
  const ex = example[path];
  if (where.startsWith("--")) return ex ? `use e.g. ${where} ${ex}` : `fix ${where}`;
  if (where.startsWith("THINIMG_")) return ex ? `set ${where} to e.g. ${ex}, or unset it for the default` : `fix ${where} or unset it for the default`;
  return "fix the value or unset the variable to use the default";
}
