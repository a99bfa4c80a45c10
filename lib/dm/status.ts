// Parsers for the kernel's thin-pool and thin status lines (Documentation/admin-guide/
// device-mapper/thin-provisioning.rst). Health and GC decide on these fields, so every field is kept.

export type PoolMode = "rw" | "ro" | "out_of_data_space";

export interface PoolStatusOk {
  kind: "ok";
  transactionId: number;
  /** In 4 KiB metadata blocks. */
  metaUsed: number;
  metaTotal: number;
  /** In pool data blocks (the pool's block size). */
  dataUsed: number;
  dataTotal: number;
  /** Metadata snapshot root block when one is held (reserve_metadata_snap), else null. */
  heldRoot: number | null;
  mode: PoolMode;
  discard: "discard_passdown" | "no_discard_passdown" | "ignore_discard";
  noSpace: "error_if_no_space" | "queue_if_no_space";
  needsCheck: boolean;
  metaLowWatermark: number | null;
  dataUsedPct: number;
  metaUsedPct: number;
  /** Target length in sectors when the full "start len thin-pool …" line was given. */
  lengthSectors: number | null;
}

export type PoolStatus = PoolStatusOk | { kind: "fail" } | { kind: "error" };

export type ThinStatus = { kind: "ok"; mappedSectors: number; highestMappedSector: number | null } | { kind: "fail" };

export class StatusParseError extends Error {}

/** Strip "name: " and "start len target " prefixes; returns the target args and the length. */
function targetArgs(line: string, target: string): { args: string[]; length: number | null } {
  let s = line.trim();
  const named = /^[^\s:]+:\s+(.*)$/.exec(s);
  if (named && /^\d+\s+\d+\s+\S+/.test(named[1]!)) s = named[1]!;
  const tok = s.split(/\s+/);
  if (tok.length >= 3 && /^\d+$/.test(tok[0]!) && /^\d+$/.test(tok[1]!) && tok[2] === target) {
    return { args: tok.slice(3), length: Number(tok[1]) };
  }
  if (tok.length >= 3 && /^\d+$/.test(tok[0]!) && /^\d+$/.test(tok[1]!) && /^[a-z-]+$/.test(tok[2]!)) {
    throw new StatusParseError(`not a ${target} status line: ${line}`);
  }
  return { args: tok, length: null };
}

function ratio(s: string, what: string): [number, number] {
  const m = /^(\d+)\/(\d+)$/.exec(s);
  if (!m) throw new StatusParseError(`bad ${what} field "${s}"`);
  return [Number(m[1]), Number(m[2])];
}

const pct = (used: number, total: number) => (total > 0 ? Math.round((used / total) * 10000) / 100 : 0);

export function parsePoolStatus(line: string): PoolStatus {
  const { args: a, length } = targetArgs(line, "thin-pool");
  if (a[0] === "Fail") return { kind: "fail" };
  if (a[0] === "Error") return { kind: "error" };
  if (a.length < 8) throw new StatusParseError(`short thin-pool status: ${line}`);
  const [tid, meta, data, held, mode, discard, noSpace, needsCheck, lowWm] = a as string[];
  if (!/^\d+$/.test(tid!)) throw new StatusParseError(`bad transaction id "${tid}"`);
  const [metaUsed, metaTotal] = ratio(meta!, "metadata");
  const [dataUsed, dataTotal] = ratio(data!, "data");
  if (mode !== "rw" && mode !== "ro" && mode !== "out_of_data_space") throw new StatusParseError(`bad mode "${mode}"`);
  if (discard !== "discard_passdown" && discard !== "no_discard_passdown" && discard !== "ignore_discard") {
    throw new StatusParseError(`bad discard mode "${discard}"`);
  }
  if (noSpace !== "error_if_no_space" && noSpace !== "queue_if_no_space") {
    throw new StatusParseError(`bad no-space mode "${noSpace}"`);
  }
  if (needsCheck !== "needs_check" && needsCheck !== "-") throw new StatusParseError(`bad needs_check "${needsCheck}"`);
  return {
    kind: "ok",
    transactionId: Number(tid),
    metaUsed,
    metaTotal,
    dataUsed,
    dataTotal,
    heldRoot: held === "-" ? null : Number(held),
    mode,
    discard,
    noSpace,
    needsCheck: needsCheck === "needs_check",
    metaLowWatermark: lowWm === undefined || lowWm === "-" ? null : Number(lowWm),
    dataUsedPct: pct(dataUsed, dataTotal),
    metaUsedPct: pct(metaUsed, metaTotal),
    lengthSectors: length,
  };
}

export function parseThinStatus(line: string): ThinStatus {
  const { args: a } = targetArgs(line, "thin");
  if (a[0] === "Fail") return { kind: "fail" };
  if (a.length < 2 || !/^\d+$/.test(a[0]!)) throw new StatusParseError(`bad thin status: ${line}`);
  return {
    kind: "ok",
    mappedSectors: Number(a[0]),
    highestMappedSector: a[1] === "-" ? null : Number(a[1]),
  };
}
