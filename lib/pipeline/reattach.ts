// Re-attach: load a handed-out snapshot's device again after a reboot (or a removal by hand) — same
// name, same thin id, same size. The data never went anywhere: a thin device is only a table over
// the pool. Idempotent (a device already loaded with our table is left as it is), health-checked,
// and fail dumb: a failed load is recorded on the snapshot and its work row, nothing is removed, and
// a load that timed out is not tried again in this run (the next run finds the device, or not).

import { existsSync } from "node:fs";
import type { Config } from "../config.ts";
import { activeDevice, activeDeviceNames } from "../dm/active.ts";
import * as dmsetup from "../dm/dmsetup.ts";
import * as pool from "../dm/pool.ts";
import { errorMessage, ThinimgError } from "../errors.ts";
import { withSharedHold } from "../lock/holders.ts";
import { type Ctx, makeCtx } from "../pool/context.ts";
import { inPoolSection } from "../pool/journal.ts";
import { tx } from "../store/db.ts";
import { setDevice, setDeviceState } from "../store/devices.ts";
import { getImage } from "../store/images.ts";
import { workSubject } from "../store/keys.ts";
import { getLayer } from "../store/layers.ts";
import { isDetached, listSnapshots, type SnapshotRow, updateSnapshot } from "../store/snapshots.ts";
import { getThinId } from "../store/thin-ids.ts";
import { beginStep, endStep, finishWork, startWork } from "../store/work.ts";
import { findSnapshot } from "./activate.ts";
import { classify, failure } from "./failure.ts";
import { preflight } from "./preflight.ts";

export type ReattachOutcome = "reattached" | "already_attached" | "would_reattach" | "failed" | "not_run";

export interface ReattachResult {
  snapshot_id: number;
  image: string;
  thin_id: number;
  device_name: string;
  device_path: string;
  outcome: ReattachOutcome;
  error: string | null;
  duration_ms: number;
}

interface Handed {
  snap: SnapshotRow;
  thinId: number;
  name: string;
  size: number;
}

const asThinimg = (e: unknown) => (e instanceof ThinimgError ? e : new ThinimgError("internal", errorMessage(e), { cause: e }));

/** The snapshot's identity, or why it cannot be re-attached (only an active one can). */
function handedOut(ctx: Ctx, snap: SnapshotRow): Handed {
  if (snap.state !== "active" || snap.thin_id === null || !snap.device_name) {
    const hint =
      snap.state === "released"
        ? "it was released: its data is garbage for GC. Activate the image again for a new snapshot"
        : "only an active (handed-out) snapshot is re-attached; `bun scripts/list.ts` shows its state";
    throw new ThinimgError("conflict", `snapshot ${snap.id} is ${snap.state}${snap.error ? ` (${snap.error})` : ""}: nothing to re-attach`, { hint });
  }
  const ledger = getThinId(ctx.db, ctx.cfg.pool, snap.thin_id);
  if (ledger && ledger.state !== "committed") {
    throw new ThinimgError(
      "conflict",
      `snapshot ${snap.id}: its thin id ${snap.thin_id} is ${ledger.state} in the ledger, not committed; refusing to load it`,
      {
        hint: "see `bun scripts/gc.ts` (dry-run) for what happened to it",
      },
    );
  }
  const size = snap.virtual_size ?? getLayer(ctx.db, snap.layer_id)?.virtual_size;
  if (!size) throw new ThinimgError("internal", `snapshot ${snap.id}: no size recorded and its layer ${snap.layer_id} is gone`);
  return { snap, thinId: snap.thin_id, name: snap.device_name, size };
}

/** Loaded already? Then it must be ours: this pool's thin id under that name. */
async function alreadyLoaded(ctx: Ctx, h: Handed): Promise<boolean> {
  if (!(await activeDevice(h.name))) return false;
  await pool.assertThinDevice(ctx.cfg.pool, h.name, h.thinId);
  return true;
}

function result(ctx: Ctx, snap: SnapshotRow, outcome: ReattachOutcome, t0: number, error: string | null = null): ReattachResult {
  return {
    snapshot_id: snap.id,
    image: getImage(ctx.db, snap.image_id)?.name ?? `#${snap.image_id}`,
    thin_id: snap.thin_id ?? -1,
    device_name: snap.device_name ?? "",
    device_path: snap.device_name ? dmsetup.mapperPath(snap.device_name) : "",
    outcome,
    error,
    duration_ms: Math.round(performance.now() - t0),
  };
}

/** Load the device, journalled like an activation's own load (work row + step intent first). */
async function load(ctx: Ctx, h: Handed): Promise<void> {
  const { db, cfg } = ctx;
  const work = startWork(db, cfg.pool, "activate", workSubject("snapshot", h.snap.id), ctx.owner);
  const step = beginStep(db, work.id, cfg.pool, "reattach_device", { thinId: h.thinId, deviceName: h.name });
  setDevice(db, { pool: cfg.pool, name: h.name, thinId: h.thinId, kind: "snap", state: "activating", reason: "re-attach" });
  try {
    await pool.activateThin(cfg.pool, h.name, h.thinId, h.size, { ctx: { pool_name: cfg.pool, device_id: h.thinId, device_name: h.name } });
  } catch (e) {
    const err = failure(`re-attach snapshot ${h.snap.id}`, e, []);
    // a load that failed (or timed out) may still have left the device: say what is there, touch nothing
    const left = await activeDevice(h.name).then(
      (d) => d !== null,
      () => true,
    );
    tx(db, () => {
      endStep(db, step.id, "failed", "error", err.message);
      setDeviceState(db, cfg.pool, h.name, left ? "active" : "removed", `re-attach failed: ${err.message}`);
      updateSnapshot(db, h.snap.id, { error: `re-attach failed: ${err.message}` });
      finishWork(db, work.id, "failed", { error: err.message, kind: classify(e).errorKind });
    });
    throw err;
  }
  tx(db, () => {
    setDeviceState(db, cfg.pool, h.name, "active");
    endStep(db, step.id, "done", "ok");
    updateSnapshot(db, h.snap.id, { error: null });
    finishWork(db, work.id, "done");
  });
}

async function reattachOne(ctx: Ctx, snap: SnapshotRow, o: { skipHealth?: boolean }): Promise<ReattachResult> {
  const t0 = performance.now();
  const h = handedOut(ctx, snap);
  if (await alreadyLoaded(ctx, h)) return result(ctx, snap, "already_attached", t0);
  if (!o.skipHealth) await preflight(ctx);
  return inPoolSection(ctx, async () => {
    // another process may have loaded it while we waited for the pool section
    if (await alreadyLoaded(ctx, h)) return result(ctx, snap, "already_attached", t0);
    await load(ctx, h);
    return result(ctx, snap, "reattached", t0);
  });
}

/** `activate --snapshot ID|NAME`: bring one handed-out snapshot's device back. */
export function reattach(ctx: Ctx, ref: string, o: { skipHealth?: boolean } = {}): Promise<ReattachResult> {
  return reattachOne(ctx, findSnapshot(ctx, ref), o);
}

export interface ReattachAllReport {
  ok: boolean;
  pool: string;
  dry_run: boolean;
  /** Why nothing was looked at (no state DB for this pool on this host), else null. */
  skipped: string | null;
  /** Every active snapshot, in id order, with what was done for it. */
  snapshots: ReattachResult[];
  error: { kind: string; message: string; hint: string | null } | null;
  summary: { active: number; reattached: number; already_attached: number; failed: number; not_run: number };
}

function summarize(pool: string, dryRun: boolean, snapshots: ReattachResult[], error: ThinimgError | null): ReattachAllReport {
  const n = (o: ReattachOutcome) => snapshots.filter((s) => s.outcome === o).length;
  return {
    ok: error === null,
    pool,
    dry_run: dryRun,
    skipped: null,
    snapshots,
    error: error ? { kind: error.kind, message: error.message, hint: error.hint ?? null } : null,
    summary: { active: snapshots.length, reattached: n("reattached"), already_attached: n("already_attached"), failed: n("failed"), not_run: n("not_run") },
  };
}

/**
 * Every snapshot the DB holds as handed out gets its device back (the boot runbook's last step).
 * One health check first; the first failure stops the run (the rest: not_run) — a sick kernel is not
 * asked again, and re-running is always safe.
 */
export async function reattachAll(ctx: Ctx, o: { dryRun?: boolean } = {}): Promise<ReattachAllReport> {
  const t0 = performance.now();
  const loaded = await activeDeviceNames();
  const active = listSnapshots(ctx.db, ctx.cfg.pool, ["active"]);
  let error: ThinimgError | null = null;
  if (!o.dryRun && active.some((s) => isDetached(s, loaded))) {
    error = await preflight(ctx).then(() => null, asThinimg);
  }
  const out: ReattachResult[] = [];
  for (const s of active) {
    if (!isDetached(s, loaded)) out.push(result(ctx, s, "already_attached", t0));
    else if (o.dryRun) out.push(result(ctx, s, "would_reattach", t0));
    else if (error) out.push(result(ctx, s, "not_run", t0));
    else {
      try {
        out.push(await reattachOne(ctx, s, { skipHealth: true }));
      } catch (e) {
        error = asThinimg(e);
        out.push(result(ctx, s, "failed", t0, error.message));
      }
    }
  }
  return summarize(ctx.cfg.pool, o.dryRun === true, out, error);
}

/** The boot runbook's last step (recover-pool): re-attach the pool's handed-out snapshots. */
export async function reattachPool(cfg: Config, o: { dryRun?: boolean | undefined }): Promise<ReattachAllReport> {
  if (!existsSync(cfg.dbPath)) {
    return {
      ...summarize(cfg.pool, o.dryRun === true, [], null),
      skipped: `no state DB at ${cfg.dbPath}: no snapshots to re-attach (pass --state-dir if thinimg keeps it elsewhere)`,
    };
  }
  const ctx = makeCtx(cfg, { command: "bun ops/recover-pool.ts (re-attach)" });
  try {
    return await withSharedHold(cfg.stateDir, { waitMs: cfg.lockWaitMs, command: ctx.owner.command }, () => reattachAll(ctx, { dryRun: o.dryRun === true }));
  } finally {
    ctx.db.close();
  }
}

/** Human lines (stderr) for a re-attach report. */
export function renderReattach(r: ReattachAllReport): string[] {
  if (r.skipped) return [`re-attach: ${r.skipped}`];
  const verb: Record<ReattachOutcome, string> = {
    reattached: "re-attached",
    already_attached: "already attached",
    would_reattach: "would re-attach",
    failed: "FAILED",
    not_run: "not run",
  };
  const lines = r.snapshots.map(
    (s) =>
      `  ${verb[s.outcome].padEnd(16)} snapshot ${s.snapshot_id} (image ${s.image}, thin id ${s.thin_id}) ${s.device_path}${s.error ? `: ${s.error}` : ""}`,
  );
  const n = r.summary;
  lines.push(
    `re-attach: ${n.active} active snapshot(s): ${n.reattached} re-attached, ${n.already_attached} already attached${n.failed ? `, ${n.failed} failed` : ""}${n.not_run ? `, ${n.not_run} not run` : ""}`,
  );
  if (r.error) lines.push(`error: ${r.error.message}${r.error.hint ? ` — ${r.error.hint}` : ""}`);
  return lines;
}
