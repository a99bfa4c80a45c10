// thin-provisioning-tools: thin_check before bringing a pool back, thin_ls/thin_dump on a metadata
// snapshot to see thin ids that no active dm device shows (GC's inactive leaks).
import { type CmdContext, run } from "../exec.ts";
import { classifyDmError, DmError } from "./errors.ts";
import { assertDevPath } from "./validate.ts";

export async function thinCheck(
  metaDev: string,
  o: { ctx?: CmdContext; timeoutMs?: number /** clear the superblock's needs_check flag when the check passes */; clearNeedsCheck?: boolean } = {},
) {
  assertDevPath(metaDev);
  const argv = ["thin_check", ...(o.clearNeedsCheck ? ["--clear-needs-check-flag"] : []), metaDev];
  const r = await run(argv, { timeoutMs: o.timeoutMs ?? 120_000, ctx: o.ctx });
  if (r.timedOut) throw new DmError("timeout", r);
  return { ok: r.exitCode === 0, output: `${r.stdout}${r.stderr}`.trim(), exitCode: r.exitCode };
}

export interface ThinLsEntry {
  id: number;
  mappedBlocks: number;
}

export function parseThinLs(out: string): ThinLsEntry[] {
  const res: ThinLsEntry[] = [];
  for (const line of out.split("\n")) {
    const m = /^\s*(\d+)\s+(\d+)\s*$/.exec(line);
    if (m) res.push({ id: Number(m[1]), mappedBlocks: Number(m[2]) });
  }
  return res;
}

/** Thin ids in the pool's metadata. With metadataSnap, reads the held snapshot (pool may be live). */
export async function thinLs(metaDev: string, o: { metadataSnap?: boolean; ctx?: CmdContext; timeoutMs?: number } = {}): Promise<ThinLsEntry[]> {
  assertDevPath(metaDev);
  const r = await run(["thin_ls", ...(o.metadataSnap ? ["--metadata-snap"] : []), "--no-headers", "--format", "DEV,MAPPED_BLOCKS", metaDev], {
    timeoutMs: o.timeoutMs ?? 60_000,
    ctx: o.ctx,
  });
  if (r.timedOut || r.exitCode !== 0) throw new DmError(classifyDmError(r), r);
  return parseThinLs(r.stdout);
}

/** Device ids from thin_dump XML (fallback when thin_ls is unavailable). */
export function parseThinDumpIds(xml: string): number[] {
  return [...xml.matchAll(/<device\s+dev_id="(\d+)"/g)].map((m) => Number(m[1]));
}

export async function thinDump(metaDev: string, o: { metadataSnap?: boolean; ctx?: CmdContext; timeoutMs?: number } = {}): Promise<string> {
  assertDevPath(metaDev);
  const r = await run(["thin_dump", ...(o.metadataSnap ? ["--metadata-snap"] : []), metaDev], {
    timeoutMs: o.timeoutMs ?? 60_000,
    ctx: o.ctx,
  });
  if (r.timedOut || r.exitCode !== 0) throw new DmError(classifyDmError(r), r);
  return r.stdout;
}

/** Superblock fields thin_repair needs on the command line when the superblock itself is damaged. */
export interface SuperblockOverrides {
  transactionId: number;
  /** In 512-byte sectors. */
  dataBlockSize: number;
  nrDataBlocks: number;
}

export function thinRepairArgv(input: string, output: string, ov?: SuperblockOverrides): string[] {
  const extra = ov
    ? ["--transaction-id", String(ov.transactionId), "--data-block-size", String(ov.dataBlockSize), "--nr-data-blocks", String(ov.nrDataBlocks)]
    : [];
  return ["thin_repair", "-i", input, "-o", output, ...extra];
}

/** thin_repair from a damaged metadata device into a new (zeroed, large enough) one. */
export async function thinRepair(input: string, output: string, o: { ctx?: CmdContext; timeoutMs?: number; overrides?: SuperblockOverrides } = {}) {
  assertDevPath(input);
  assertDevPath(output);
  const r = await run(thinRepairArgv(input, output, o.overrides), { timeoutMs: o.timeoutMs ?? 600_000, ctx: o.ctx });
  if (r.timedOut) throw new DmError("timeout", r);
  const out = `${r.stdout}${r.stderr}`.trim();
  // thin_repair 0.9: "The following field needs to be provided on the command line due to corruption in the superblock"
  return { ok: r.exitCode === 0, output: out, exitCode: r.exitCode, needsOverrides: /provided on the command line/i.test(out) };
}
