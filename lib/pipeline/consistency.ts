// Does the DB agree with the pool? Used after crash/fault tests and by operators (`list --check`):
// every committed layer / active snapshot exists in the pool, every thin id in the pool is in the
// ledger, nothing is left pending, and every device and mount of ours is either live or recorded as
// leaked. Reads the pool's thin ids from a metadata snapshot (reserve → thin_ls → release, always).
import * as dmsetup from "../dm/dmsetup.ts";
import * as mnt from "../dm/mount.ts";
import { isSelf, staleness } from "../lock/owner.ts";
import type { Ctx } from "../pool/context.ts";
import { inPoolSection, readPoolThinIds } from "../pool/journal.ts";
import { parseDeviceName } from "../pool/names.ts";
import { listDevices } from "../store/devices.ts";
import { listLayers } from "../store/layers.ts";
import { listMounts } from "../store/mounts.ts";
import { listSnapshots } from "../store/snapshots.ts";
import { listThinIds } from "../store/thin-ids.ts";
import { listWork, pendingSteps } from "../store/work.ts";

/** Thin ids present in the pool's metadata right now. */
export function poolThinIds(ctx: Ctx): Promise<number[]> {
  return inPoolSection(ctx, () => readPoolThinIds(ctx.cfg.pool, { stateDir: ctx.cfg.stateDir }));
}

export interface ConsistencyReport {
  ok: boolean;
  problems: string[];
  pool_ids: number[];
  leaked: { thin_ids: number[]; devices: string[]; mounts: string[] };
}

export async function checkConsistency(ctx: Ctx): Promise<ConsistencyReport> {
  const { db, cfg } = ctx;
  const name = cfg.pool;
  const problems: string[] = [];
  const ids = await poolThinIds(ctx);
  const inPool = new Set(ids);
  const ledger = new Map(listThinIds(db, name).map((t) => [t.thin_id, t]));
  const dead = (pid: number, st: number | null, host: string) => !isSelf({ pid, startTime: st, host }) && staleness({ pid, startTime: st, host }).stale;

  for (const s of pendingSteps(db, name)) problems.push(`step ${s.id} (${s.name}, thin ${s.thin_id}) still pending`);
  for (const w of listWork(db, name, ["running"]))
    if (dead(w.pid, w.start_time, w.host)) problems.push(`work ${w.id} (${w.kind} ${w.subject}) running but pid ${w.pid} is dead`);

  for (const l of listLayers(db, name)) {
    if (l.state !== "committed") continue;
    if (l.thin_id === null || !inPool.has(l.thin_id)) problems.push(`committed layer ${l.id} has thin id ${l.thin_id} which is not in the pool`);
    else if (ledger.get(l.thin_id)?.state !== "committed")
      problems.push(`committed layer ${l.id}: ledger says thin id ${l.thin_id} is ${ledger.get(l.thin_id)?.state}`);
  }
  for (const s of listSnapshots(db, name, ["active"])) {
    if (s.thin_id === null || !inPool.has(s.thin_id)) problems.push(`active snapshot ${s.id} has thin id ${s.thin_id} which is not in the pool`);
  }
  for (const t of ledger.values()) {
    if (t.state === "committed" && !inPool.has(t.thin_id)) problems.push(`ledger: thin id ${t.thin_id} committed but not in the pool`);
  }
  for (const id of ids) {
    const t = ledger.get(id);
    if (!t) problems.push(`pool thin id ${id} is not in the ledger`);
    else if (t.state === "deleted") problems.push(`pool thin id ${id}: ledger says deleted`);
  }

  const devRows = new Map(listDevices(db, name).map((d) => [d.name, d]));
  const active = (await dmsetup.ls()).filter((d) => parseDeviceName(cfg.prefix, name, d.name) !== null);
  for (const d of active) {
    const row = devRows.get(d.name);
    if (!row) problems.push(`active device ${d.name} is not recorded`);
    else if (row.state !== "active" && row.state !== "leaked") problems.push(`active device ${d.name} is recorded as ${row.state}`);
  }
  for (const row of devRows.values()) {
    if (row.state === "active" && !active.some((d) => d.name === row.name)) problems.push(`device ${row.name} recorded active but not present`);
  }
  const mountRows = new Map(listMounts(db, name).map((m) => [m.path, m]));
  for (const m of mnt.mountinfo().filter((e) => e.mountPoint.startsWith(`${cfg.mountDir}/`))) {
    const row = mountRows.get(m.mountPoint);
    if (!row) problems.push(`mount ${m.mountPoint} is not recorded`);
    else if (row.state !== "mounted" && row.state !== "leaked") problems.push(`mount ${m.mountPoint} is recorded as ${row.state}`);
  }
  return {
    ok: problems.length === 0,
    problems,
    pool_ids: ids,
    leaked: {
      thin_ids: [...ledger.values()].filter((t) => t.state === "orphaned" && inPool.has(t.thin_id)).map((t) => t.thin_id),
      devices: [...devRows.values()].filter((d) => d.state === "leaked").map((d) => d.name),
      mounts: [...mountRows.values()].filter((m) => m.state === "leaked").map((m) => m.path),
    },
  };
}
