// Before a pool is loaded its metadata passes thin_check — or the run stops with the repair steps
// (or, with --repair, runs them). A blank superblock of a new pool is the kernel's to format.
import { join } from "node:path";
import * as thintools from "../dm/thintools.ts";
import { metaTimeoutMs, superblockBlank, toolReason } from "./observe.ts";
import type { PoolRecord } from "./record.ts";
import { type RepairContext, repairMetadata, repairPlan } from "./repair.ts";
import type { RecoverRun } from "./run.ts";
import { Blocked, shellLine } from "./runbook.ts";

/** A dry run on a filesystem thin_check cannot open O_DIRECT (hostfs): the check is a planned step. */
function plannedCheck(r: RecoverRun, metaDev: string): string {
  const argv = ["thin_check", "--clear-needs-check-flag", metaDev];
  r.rb.steps.push({
    name: "check-metadata",
    status: "planned",
    argv,
    command: shellLine(argv),
    detail: "thin_check the metadata (this filesystem cannot be checked without a loop device); if it fails the run stops with the repair steps",
  });
  return metaDev;
}

/** The metadata device to load the pool with: metaDev, or the repaired one (--repair). */
export async function checkMetadata(r: RecoverRun, rec: PoolRecord, metaDev: string): Promise<string> {
  const metaPath = join(r.dir, rec.meta_file);
  const blank = superblockBlank(metaPath);
  if (blank && rec.state === "creating") {
    r.rb.note("check-metadata", "new pool: the metadata is blank; the kernel formats it when the pool is first loaded", "skipped");
    return metaDev;
  }
  // Dry run with nothing attached: check the file itself (nothing uses it; thin_check only reads).
  const target = metaDev.startsWith("$") ? metaPath : metaDev;
  // A passing check also clears the superblock's needs_check flag, which would otherwise keep the
  // pool read-only — except in a dry run, which writes nothing.
  const argv = ["thin_check", ...(r.rb.dryRun ? [] : ["--clear-needs-check-flag"]), target];
  const res = await thintools.thinCheck(target, { clearNeedsCheck: !r.rb.dryRun, timeoutMs: metaTimeoutMs(rec.meta_size), ctx: { pool_name: rec.pool } });
  if (res.ok) {
    r.rb.note("check-metadata", `thin_check passed on ${target}`, "ok", argv);
    return metaDev;
  }
  if (target === metaPath && /syscall 'open' failed/.test(res.output)) return plannedCheck(r, metaDev);
  const why = blank
    ? `the metadata superblock of ${metaPath} is all zeros (wiped); loading the pool would format it and lose every thin device`
    : `thin_check failed on ${target}: ${toolReason(res.output) || `exit ${res.exitCode}`}`;
  r.rb.note("check-metadata", why, "failed", argv);
  const rc: RepairContext = { rb: r.rb, dir: r.dir, transactionId: r.o.transactionId, now: r.probe.now() };
  if (!r.o.repair) {
    throw new Blocked(
      "unhealthy",
      `metadata of pool ${rec.pool} is damaged: ${why}`,
      "the pool was NOT loaded. Repair it with --repair (thin_repair into a new file, old file kept), or run the next steps by hand",
      repairPlan(rc, rec, metaDev),
    );
  }
  return repairMetadata(rc, rec, metaDev);
}
