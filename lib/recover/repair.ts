// Metadata repair: thin_repair into a NEW file, check it, then swap it in with one atomic rename,
// keeping the damaged file under another name (a hard link, so nothing is copied or lost). The same
// procedure is printed as commands for an operator (repairPlan) and performed with --repair
// (repairMetadata). At every instant the metadata file is the old or the new one, and a re-run after a
// crash anywhere in it starts over from a consistent state (the scratch file is never the live one).
import { existsSync, linkSync, renameSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { makeBackingFile } from "../dm/loop-pool.ts";
import * as losetup from "../dm/losetup.ts";
import * as thintools from "../dm/thintools.ts";
import { formatBytes } from "../util/units.ts";
import { fileId, loopsOf, metaTimeoutMs, toolReason } from "./observe.ts";
import { type PoolRecord, recordPath, writeRecord } from "./record.ts";
import { Blocked, type Runbook, shellLine, sizeFileShell } from "./runbook.ts";

export const REPAIR_SUFFIX = ".repair";

export interface RepairContext {
  rb: Runbook;
  dir: string;
  /** --transaction-id: for a destroyed superblock; default the record's last seen one. */
  transactionId?: number | undefined;
  now: Date;
}

function timestamp(d: Date): string {
  return d
    .toISOString()
    .replace(/[-:]/g, "")
    .replace(/\.\d+Z$/, "Z");
}

export function repairPaths(c: RepairContext, rec: PoolRecord) {
  const metaPath = join(c.dir, rec.meta_file);
  const stamp = timestamp(c.now);
  let kept = `${rec.meta_file}.broken-${stamp}`;
  for (let i = 2; existsSync(join(c.dir, kept)); i++) kept = `${rec.meta_file}.broken-${stamp}-${i}`;
  return { metaPath, scratch: join(c.dir, `${rec.meta_file}${REPAIR_SUFFIX}`), kept, keptPath: join(c.dir, kept) };
}

/** Superblock fields for thin_repair when the superblock is destroyed, or null without a transaction id. */
export function superblockOverrides(c: RepairContext, rec: PoolRecord): thintools.SuperblockOverrides | null {
  const txid = c.transactionId ?? rec.last_transaction_id;
  if (txid === null || txid === undefined) return null;
  return { transactionId: txid, dataBlockSize: rec.block_sectors, nrDataBlocks: rec.data_sectors / rec.block_sectors };
}

/** thin_repair, and when the superblock itself is destroyed, again with its fields from the record. */
function thinRepairShell(c: RepairContext, rec: PoolRecord, metaDev: string, out = "$REPAIR_DEV"): string {
  const plain = shellLine(thintools.thinRepairArgv(metaDev, out));
  const ov = superblockOverrides(c, rec);
  const blocks = rec.data_sectors / rec.block_sectors;
  return ov
    ? `${plain} || ${shellLine(thintools.thinRepairArgv(metaDev, out, ov))}`
    : `${plain}  # if it asks for fields: add --transaction-id N (the pool's last) --data-block-size ${rec.block_sectors} --nr-data-blocks ${blocks}`;
}

/** The manual repair as commands — what --repair does, step for step. */
export function repairPlan(c: RepairContext, rec: PoolRecord, metaDev: string): string[] {
  const { metaPath, scratch, keptPath } = repairPaths(c, rec);
  return [
    shellLine(["rm", "-f", scratch]),
    sizeFileShell(rec.meta_size, scratch),
    shellLine(["losetup", "--find", "--show", scratch], "REPAIR_DEV"),
    thinRepairShell(c, rec, metaDev),
    shellLine(["thin_check", "$REPAIR_DEV"]),
    shellLine(["losetup", "--detach", "$REPAIR_DEV"]),
    shellLine(["losetup", "--detach", metaDev]),
    shellLine(["ln", metaPath, keptPath]),
    shellLine(["mv", "-T", scratch, metaPath]),
    shellLine(["bun", "ops/recover-pool.ts", "--dir", c.dir]),
  ];
}

type Ctx = { pool_name: string };
const none = { planned: undefined };

/** The scratch file is never the live metadata (only the final rename makes it so): a leftover
 * from an interrupted repair, and any loop on it, are ours to discard. */
async function discardScratch(rb: Runbook, scratch: string, ctx: Ctx): Promise<void> {
  if (existsSync(scratch) || rb.dryRun) {
    for (const l of loopsOf(await losetup.listDetailed(ctx), fileId(scratch))) {
      await rb.act(
        "repair-cleanup",
        `detach ${l.device} left on ${scratch} by an interrupted repair`,
        { ...none, argv: ["losetup", "--detach", l.device] },
        () => losetup.detach(l.device, ctx),
      );
    }
    await rb.act("repair-cleanup", `remove the scratch file ${scratch}`, { ...none, argv: ["rm", "-f", scratch] }, () => {
      if (existsSync(scratch)) unlinkSync(scratch);
    });
  }
}

/** A fresh scratch file of the metadata's size, attached; returns its loop. */
async function attachScratch(rb: Runbook, rec: PoolRecord, scratch: string, ctx: Ctx): Promise<string> {
  await rb.act(
    "repair-file",
    `new metadata file ${scratch} (${formatBytes(rec.meta_size)})`,
    {
      ...none,
      argv: ["fallocate", "-l", String(rec.meta_size), scratch],
      shell: sizeFileShell(rec.meta_size, scratch),
      done: (how) => `${scratch} via ${how}`,
    },
    () => makeBackingFile(scratch, rec.meta_size),
  );
  return await rb.act(
    "repair-attach",
    `attach ${scratch}`,
    { argv: ["losetup", "--find", "--show", scratch], assign: "REPAIR_DEV", planned: "$REPAIR_DEV", done: (d) => `${scratch} on ${d}` },
    () => losetup.attach(scratch, { ctx }),
  );
}

/** thin_repair metaDev into repairDev (with the record's superblock fields when it asks for them),
 * then thin_check the result. Returns the transaction id taken from the record, or null. */
async function rebuildMetadata(c: RepairContext, rec: PoolRecord, metaDev: string, repairDev: string, metaPath: string, ctx: Ctx): Promise<number | null> {
  const rb = c.rb;
  const untouched = `the damaged metadata is untouched in ${metaPath}; the pool was not loaded`;
  const ov = superblockOverrides(c, rec);
  const timeoutMs = metaTimeoutMs(rec.meta_size, 4);
  let usedTxid: number | null = null;
  await rb.act(
    "thin-repair",
    `rebuild the metadata from ${metaDev} into ${repairDev}`,
    {
      ...none,
      argv: thintools.thinRepairArgv(metaDev, repairDev),
      shell: thinRepairShell(c, rec, metaDev),
      done: () =>
        usedTxid === null
          ? `metadata rebuilt into ${repairDev}`
          : `metadata rebuilt into ${repairDev}; the superblock was destroyed, so its fields came from the record (transaction id ${usedTxid})`,
    },
    async () => {
      let r = await thintools.thinRepair(metaDev, repairDev, { timeoutMs, ctx });
      if (!r.ok && r.needsOverrides && ov) {
        r = await thintools.thinRepair(metaDev, repairDev, { timeoutMs, ctx, overrides: ov });
        if (r.ok) usedTxid = ov.transactionId;
      }
      if (!r.ok) {
        throw new Blocked(
          "unhealthy",
          `thin_repair could not rebuild the metadata of pool ${rec.pool}: ${toolReason(r.output) || `exit ${r.exitCode}`}`,
          `${untouched}. Restore the metadata from a backup or get expert help (thin_dump --repair, thin_restore)`,
          r.needsOverrides && !ov ? [thinRepairShell(c, rec, metaDev, repairDev)] : [],
        );
      }
    },
  );
  await rb.act("check-repaired", `thin_check the rebuilt metadata on ${repairDev}`, { ...none, argv: ["thin_check", repairDev] }, async () => {
    const r = await thintools.thinCheck(repairDev, { timeoutMs: metaTimeoutMs(rec.meta_size), ctx });
    if (!r.ok)
      throw new Blocked(
        "unhealthy",
        `the rebuilt metadata fails thin_check too: ${toolReason(r.output)}`,
        `${untouched}. Restore the metadata from a backup or get expert help`,
      );
  });
  return usedTxid;
}

/** Detach both loops, keep the damaged file under another name, rename the scratch file over it. */
async function swapIn(rb: Runbook, metaDev: string, repairDev: string, paths: ReturnType<typeof repairPaths>, ctx: Ctx): Promise<void> {
  const { metaPath, scratch, keptPath } = paths;
  await rb.act("repair-detach", `detach ${repairDev}`, { ...none, argv: ["losetup", "--detach", repairDev] }, () => losetup.detach(repairDev, ctx));
  // Detach the damaged file's loop BEFORE the swap: afterwards it would show as "metadata.img (deleted)"
  // and could be mistaken for the new file's loop by anything matching on names.
  await rb.act("repair-detach", `detach the damaged metadata's loop ${metaDev}`, { ...none, argv: ["losetup", "--detach", metaDev] }, () =>
    losetup.detach(metaDev, ctx),
  );
  await rb.act("keep-old-metadata", `keep the damaged metadata as ${keptPath}`, { ...none, argv: ["ln", metaPath, keptPath] }, () =>
    linkSync(metaPath, keptPath),
  );
  // One atomic rename swaps the files: at every instant metadata.img is the old or the new one.
  await rb.act("swap-metadata", `${scratch} becomes ${metaPath}`, { ...none, argv: ["mv", "-T", scratch, metaPath] }, () => renameSync(scratch, metaPath));
}

/** Attach the repaired metadata file and thin_check it (clearing needs_check); returns its loop. */
async function attachRepaired(rb: Runbook, rec: PoolRecord, metaPath: string, keptPath: string, ctx: Ctx): Promise<string> {
  const newDev = await rb.act(
    "attach-loop",
    `attach the repaired metadata file ${metaPath}`,
    { argv: ["losetup", "--find", "--show", metaPath], assign: "META_DEV", planned: "$META_DEV", done: (d) => `metadata file ${metaPath} on ${d}` },
    () => losetup.attach(metaPath, { ctx }),
  );
  if (!rb.dryRun) {
    const r = await thintools.thinCheck(newDev, { clearNeedsCheck: true, timeoutMs: metaTimeoutMs(rec.meta_size), ctx });
    if (!r.ok) {
      throw new Blocked(
        "unhealthy",
        `the repaired metadata on ${newDev} fails thin_check: ${toolReason(r.output)}`,
        `the pool was not loaded; the old metadata is kept as ${keptPath}`,
      );
    }
    rb.note("check-metadata", `thin_check passed on the repaired metadata (${newDev})`, "ok", ["thin_check", "--clear-needs-check-flag", newDev]);
  }
  return newDev;
}

/** Perform the repair (pool not loaded; metaDev = the damaged metadata's loop). Returns the loop of
 * the repaired metadata, checked. Updates `rec` (repairs history). Fail dumb: on an error, whatever
 * was attached stays attached and the damaged file stays in place. */
export async function repairMetadata(c: RepairContext, rec: PoolRecord, metaDev: string): Promise<string> {
  const paths = repairPaths(c, rec);
  const { metaPath, scratch, kept, keptPath } = paths;
  const ctx = { pool_name: rec.pool };
  const rb = c.rb;
  await discardScratch(rb, scratch, ctx);
  const repairDev = await attachScratch(rb, rec, scratch, ctx);
  const usedTxid = await rebuildMetadata(c, rec, metaDev, repairDev, metaPath, ctx);
  await swapIn(rb, metaDev, repairDev, paths, ctx);
  const at = c.now.toISOString();
  const updated: PoolRecord = { ...rec, updated_at: at, repairs: [...rec.repairs, { at, kept, transaction_id: usedTxid }] };
  await rb.act("write-record", `note the repair in ${recordPath(c.dir)}`, none, () => writeRecord(c.dir, updated));
  Object.assign(rec, updated);
  return await attachRepaired(rb, rec, metaPath, keptPath, ctx);
}
