// The end of every bring-up: the loaded pool must be usable (rw, not needs_check, not Fail/Error),
// and the record then says ready, with the transaction id just seen (thin_repair's fallback).
import { poolStatus } from "../dm/pool.ts";
import type { PoolStatus } from "../dm/status.ts";
import { type PoolRecord, recordPath, writeRecord } from "./record.ts";
import { statusJson } from "./report.ts";
import type { RecoverRun } from "./run.ts";
import { Blocked, shellLine } from "./runbook.ts";

/** Why this status makes the pool unusable, as the Blocked error to throw; null when it is fine. */
function unusable(r: RecoverRun, name: string, s: PoolStatus): Blocked | null {
  const deactivate = [
    shellLine(["dmsetup", "ls", "--tree"]),
    "# remove every thin device on the pool (dmsetup remove NAME; unmount first), then:",
    shellLine(["dmsetup", "remove", name]),
    r.recoverCommand(),
  ];
  const hint =
    "the pool was left as it is. Stop what uses it, remove its thin devices and the pool (dmsetup remove without --force), then re-run recover-pool: it runs thin_check first";
  if (s.kind === "fail")
    return new Blocked("unhealthy", `pool ${name} is in Fail mode (the kernel stopped it after a metadata or device error)`, hint, deactivate);
  if (s.kind === "error") return new Blocked("unhealthy", `pool ${name} reports Error status`, hint, deactivate);
  if (s.needsCheck) return new Blocked("unhealthy", `pool ${name} has needs_check set: its metadata must be checked`, hint, deactivate);
  if (s.mode === "out_of_data_space") {
    return new Blocked(
      "unhealthy",
      `pool ${name} is out of data space (${s.dataUsed}/${s.dataTotal} blocks)`,
      "grow the data device (recover-pool --grow-data +SIZE), then free space with `bun scripts/gc.ts --force`",
      [shellLine(["dmsetup", "status", name])],
    );
  }
  if (s.mode !== "rw") return new Blocked("unhealthy", `pool ${name} is read-only (mode ${s.mode}): the kernel hit a metadata error`, hint, deactivate);
  return null;
}

/** Status must be rw, not needs_check, not Fail/Error. `read` false: dry run before the pool exists. */
export async function verify(r: RecoverRun, rec: PoolRecord, read: boolean): Promise<void> {
  const name = rec.pool;
  if (!read) {
    r.rb.steps.push({
      name: "verify-status",
      status: "planned",
      argv: ["dmsetup", "status", name],
      command: shellLine(["dmsetup", "status", name]),
      detail: "expect rw, no needs_check",
    });
    return;
  }
  const s = await poolStatus(name, { ctx: { pool_name: name } });
  r.status = statusJson(s);
  const blocked = unusable(r, name, s);
  if (blocked) throw blocked;
  if (s.kind !== "ok") return; // unusable() refused every other kind
  r.rb.note(
    "verify-status",
    `rw; data ${s.dataUsedPct}% used (${s.dataUsed}/${s.dataTotal} blocks), metadata ${s.metaUsedPct}% used; transaction ${s.transactionId}`,
    "ok",
    ["dmsetup", "status", name],
  );
}

/** Record state ready and the transaction id just seen (thin_repair's fallback). */
export async function markReady(r: RecoverRun, rec: PoolRecord): Promise<void> {
  const now = r.probe.now().toISOString();
  const txid = r.status?.transaction_id ?? rec.last_transaction_id;
  await r.rb.act(
    "write-record",
    `${rec.state === "creating" ? "mark the pool ready" : "note the transaction id"} in ${recordPath(r.dir)}`,
    { planned: undefined },
    () => writeRecord(r.dir, { ...rec, state: "ready", updated_at: now, last_transaction_id: txid, last_seen_at: now }),
  );
}
