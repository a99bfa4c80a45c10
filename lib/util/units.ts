// Parsing of human sizes, numbers and durations for flags and config (citty has no number args).
import { usageError } from "../errors.ts";

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  B: 1,
  K: 1024,
  KB: 1024,
  KIB: 1024,
  M: 1024 ** 2,
  MB: 1024 ** 2,
  MIB: 1024 ** 2,
  G: 1024 ** 3,
  GB: 1024 ** 3,
  GIB: 1024 ** 3,
  T: 1024 ** 4,
  TB: 1024 ** 4,
  TIB: 1024 ** 4,
};

/** "64K", "2G", "1.5GiB", "4096" → bytes (binary units: thin pools think in 512-byte sectors). */
export function parseSize(value: string, flag: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(value);
  const unit = m ? SIZE_UNITS[m[2]!.toUpperCase()] : undefined;
  if (!m || unit === undefined) {
    throw usageError(`${flag}: "${value}" is not a size`, "use a number with an optional unit, e.g. 64K, 512M, 2G");
  }
  const n = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(n) || n <= 0) throw usageError(`${flag}: "${value}" must be a positive size`);
  return n;
}

export function parseIntArg(value: string, flag: string, opts: { min?: number; max?: number } = {}): number {
  if (!/^-?\d+$/.test(value.trim())) throw usageError(`${flag}: "${value}" is not a whole number`);
  const n = Number(value);
  if (opts.min !== undefined && n < opts.min) throw usageError(`${flag}: ${n} is below the minimum ${opts.min}`);
  if (opts.max !== undefined && n > opts.max) throw usageError(`${flag}: ${n} is above the maximum ${opts.max}`);
  return n;
}

/** "10s", "500ms", "10m", "2h", "30" (seconds) → milliseconds. With `unit: "required"` a bare
 * number other than 0 is refused: for an age counted in days (`prune --unused-for 7`), seconds are
 * never what was meant. */
export function parseDuration(value: string, flag: string, o: { unit?: "required" } = {}): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(value);
  if (!m) throw usageError(`${flag}: "${value}" is not a duration`, "use e.g. 500ms, 10s, 10m, 1h, 7d");
  if (o.unit === "required" && m[2] === undefined && Number(m[1]) !== 0)
    throw usageError(`${flag}: "${value}" has no unit`, `write e.g. ${m[1]}d or ${m[1]}h (a bare number would be seconds)`);
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[(m[2] ?? "s") as "ms" | "s" | "m" | "h" | "d"];
  return Math.round(Number(m[1]) * mult);
}

export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}
