// The GC report: one JSON document with stable snake_case keys (--json), and the same content as a
// short human listing. Every orphan carries the exact commands a --force run sends for it, so a
// dry-run shows precisely what would be done.
import { formatBytes } from "../util/units.ts";
import type { ActionResult, ActResult, StepResult } from "./act.ts";
import { type ForeignDevice, NEEDS_HUMAN, type Orphan, type Plan, type Repair, type Skip } from "./model.ts";

export interface GcReportInput {
  mode: "dry_run" | "force";
  pool: string;
  stateDir: string;
  graceMs: number;
  startedAt: number;
  finishedAt: number;
  lock: { status: "acquired" | "ignored" | "held" | "not_taken"; holder: string | null };
  health: { ok: boolean; detail: string } | null;
  scan: {
    ours: number;
    foreign: number;
    unrelated: number;
    metadata: {
      status: "ok" | "skipped";
      method: string | null;
      thinIds: number | null;
      staleHold: { heldRoot: number; released: boolean } | null;
      skipped: string | null;
    };
    dbKnown: boolean;
  };
  plan: Plan | null;
  act: ActResult | null;
  repairsApplied: boolean;
  /** Repairs skipped at apply time because their rows changed since the scan. */
  repairsNotApplied?: Repair[];
  /** Reconciled dead intents before scanning (force only). */
  reconciled: number;
  /** A fatal refusal before planning (lock, health): the run did nothing. */
  refused: { reason: string; detail: string } | null;
  /** Kernel messages caused by this run's own unmounts of devices it then removed. */
  kernelMessages: string[];
  notes: string[];
}

export interface OrphanJson {
  thin_id: number | null;
  device: string | null;
  reason: string;
  detail: string;
  age_ms: number | null;
  mapped_bytes: number | null;
  commands: string[];
  /** would_remove (dry-run) | done | skipped | failed | not_run */
  outcome: string;
  skip_reason: string | null;
  steps: { op: string; target: string; outcome: string; duration_ms: number; error: string | null }[];
}

export interface GcReport {
  ok: boolean;
  exit_code: 0 | 1;
  mode: "dry_run" | "force";
  pool: string;
  state_dir: string;
  grace_ms: number;
  started_at: string;
  duration_ms: number;
  lock: { status: string; holder: string | null };
  health: { ok: boolean; detail: string } | null;
  refused: { reason: string; detail: string } | null;
  reconciled: number;
  scan: {
    devices_ours: number;
    devices_foreign: number;
    devices_unrelated: number;
    metadata_status: string;
    metadata_method: string | null;
    metadata_thin_ids: number | null;
    metadata_skipped: string | null;
    stale_metadata_hold: { held_root: number; released: boolean } | null;
    db_known: boolean;
  };
  orphans: OrphanJson[];
  skipped: { thin_id: number | null; device: string | null; reason: string; orphan_reason: string; detail: string; needs_human: boolean }[];
  repairs: { kind: string; thin_id: number | null; device: string | null; path: string | null; detail: string; applied: boolean }[];
  /** Snapshots handed out and never released whose device is not loaded: kept, need a re-attach. */
  detached: { snapshot_id: number | null; thin_id: number; device: string; detail: string }[];
  foreign: { name: string; thin_id: number | null; why: string; detail: string }[];
  stopped: { reason: string; detail: string } | null;
  /** What the kernel logged while this run unmounted devices it then removed (see act.ts). */
  kernel_messages: string[];
  notes: string[];
  summary: {
    orphans: number;
    removed: number;
    skipped: number;
    failed: number;
    not_run: number;
    repairs: number;
    detached: number;
    foreign: number;
    needs_human: boolean;
    mapped_bytes: number;
  };
}

/** The exact commands --force sends for one orphan (dmsetup flags for udev aside). */
export function commandsFor(pool: string, a: Orphan): string[] {
  return [
    ...a.unmount.map((p) => `umount ${p}`),
    ...(a.device ? [`dmsetup remove ${a.device}`] : []),
    ...(a.deleteThin && a.thinId !== null ? [`dmsetup message ${pool} 0 "delete ${a.thinId}"`] : []),
  ];
}

const stepJson = (s: StepResult) => ({ op: s.op, target: s.target, outcome: s.outcome, duration_ms: s.durationMs, error: s.error });

/** Each planned orphan with its commands and, after a --force run, its outcome and steps. */
function orphansJson(i: GcReportInput): OrphanJson[] {
  const byAction = new Map<Orphan, ActionResult>();
  for (const r of i.act?.results ?? []) byAction.set(r.action, r);
  return (i.plan?.actions ?? []).map((a) => {
    const r = byAction.get(a);
    return {
      thin_id: a.thinId,
      device: a.device,
      reason: a.reason,
      detail: a.detail,
      age_ms: a.ageMs,
      mapped_bytes: a.mappedBytes,
      commands: commandsFor(i.pool, a),
      outcome: i.mode === "dry_run" ? "would_remove" : (r?.outcome ?? "not_run"),
      skip_reason: r?.skipReason ?? null,
      steps: (r?.steps ?? []).map(stepJson),
    };
  });
}

/** The scan's section of the report. */
function scanJson(scan: GcReportInput["scan"]): GcReport["scan"] {
  return {
    devices_ours: scan.ours,
    devices_foreign: scan.foreign,
    devices_unrelated: scan.unrelated,
    metadata_status: scan.metadata.status,
    metadata_method: scan.metadata.method,
    metadata_thin_ids: scan.metadata.thinIds,
    metadata_skipped: scan.metadata.skipped,
    stale_metadata_hold: scan.metadata.staleHold ? { held_root: scan.metadata.staleHold.heldRoot, released: scan.metadata.staleHold.released } : null,
    db_known: scan.dbKnown,
  };
}

export function buildReport(i: GcReportInput): GcReport {
  const plan = i.plan;
  const orphans = orphansJson(i);
  const skipped = (plan?.skips ?? []).map((s: Skip) => ({
    thin_id: s.thinId,
    device: s.device,
    reason: s.reason,
    orphan_reason: s.orphanReason,
    detail: s.detail,
    needs_human: NEEDS_HUMAN[s.reason],
  }));
  const repairs = (plan?.repairs ?? []).map((r: Repair) => ({
    kind: r.kind,
    thin_id: r.thinId,
    device: r.device,
    path: r.path,
    detail: r.detail,
    applied: i.repairsApplied && !(i.repairsNotApplied ?? []).includes(r),
  }));
  const detached = (plan?.detached ?? []).map((d) => ({ snapshot_id: d.snapshotId, thin_id: d.thinId, device: d.device, detail: d.detail }));
  const foreign = (plan?.foreign ?? []).map((f: ForeignDevice) => ({ name: f.name, thin_id: f.thinId, why: f.why, detail: f.detail }));
  const count = (o: string) => orphans.filter((x) => x.outcome === o).length;
  const failed = count("failed");
  const stopped = i.act?.stopped ?? null;
  const metaSkipped = i.scan.metadata.status === "skipped";
  const needsHuman =
    skipped.some((s) => s.needs_human) ||
    detached.length > 0 ||
    (i.scan.metadata.staleHold !== null && !i.scan.metadata.staleHold.released) ||
    (metaSkipped && i.scan.metadata.skipped !== null && !/busy/.test(i.scan.metadata.skipped)) ||
    (i.health !== null && !i.health.ok);
  const bad = failed > 0 || stopped !== null || i.refused !== null || needsHuman;
  return {
    ok: !bad,
    exit_code: bad ? 1 : 0,
    mode: i.mode,
    pool: i.pool,
    state_dir: i.stateDir,
    grace_ms: i.graceMs,
    started_at: new Date(i.startedAt).toISOString(),
    duration_ms: i.finishedAt - i.startedAt,
    lock: i.lock,
    health: i.health,
    refused: i.refused,
    reconciled: i.reconciled,
    scan: scanJson(i.scan),
    orphans,
    skipped,
    repairs,
    detached,
    foreign,
    stopped,
    kernel_messages: i.kernelMessages,
    notes: i.notes,
    summary: {
      orphans: orphans.length,
      removed: count("done"),
      skipped: skipped.length + count("skipped"),
      failed,
      not_run: count("not_run"),
      repairs: repairs.length,
      detached: detached.length,
      foreign: foreign.length,
      needs_human: needsHuman,
      mapped_bytes: orphans.reduce((n, o) => n + (o.mapped_bytes ?? 0), 0),
    },
  };
}

const what = (thinId: number | null, device: string | null) =>
  [device ? `device ${device}` : null, thinId !== null ? `thin id ${thinId}` : null].filter(Boolean).join(" / ");

/** The human listing (stdout without --json). */
export function formatHuman(r: GcReport): string {
  const out: string[] = [];
  const dry = r.mode === "dry_run";
  out.push(`gc ${dry ? "dry-run" : "--force"} on pool ${r.pool} (state dir ${r.state_dir}, grace ${Math.round(r.grace_ms / 1000)}s)`);
  if (r.refused) out.push(`REFUSED: ${r.refused.detail}`);
  else if (r.health && !r.health.ok) out.push(`UNHEALTHY (metadata not read; report from dmsetup alone): ${r.health.detail}`);
  out.push(
    `scanned: ${r.scan.devices_ours} device(s) of ours, ${r.scan.devices_foreign} foreign, ${r.scan.metadata_thin_ids ?? "?"} thin id(s) in the pool metadata (${r.scan.metadata_method ?? r.scan.metadata_status})`,
  );
  if (r.orphans.length === 0 && r.skipped.length === 0 && !r.refused) out.push("no orphans found");
  if (r.orphans.length) {
    out.push(dry ? `would remove ${r.orphans.length} orphan(s) (run with --force to act):` : `orphans (${r.orphans.length}):`);
    for (const o of r.orphans) {
      const size = o.mapped_bytes ? `, ${formatBytes(o.mapped_bytes)} mapped` : "";
      const age = o.age_ms === null ? "" : `, age ${Math.round(o.age_ms / 1000)}s`;
      out.push(`  ${dry ? "-" : `[${o.outcome}]`} ${what(o.thin_id, o.device)}: ${o.reason} — ${o.detail}${size}${age}`);
      for (const c of o.commands) out.push(`      ${c}`);
      if (o.skip_reason) out.push(`      skipped: ${o.skip_reason}`);
      for (const s of o.steps) if (s.outcome !== "ok") out.push(`      ${s.op} ${s.target}: ${s.outcome}${s.error ? ` (${s.error})` : ""}`);
    }
  }
  if (r.skipped.length) {
    out.push(`left alone this run (${r.skipped.length}):`);
    for (const s of r.skipped)
      out.push(`  - ${what(s.thin_id, s.device)}: ${s.reason}${s.needs_human ? " [needs a human]" : ""} — ${s.detail} (would be: ${s.orphan_reason})`);
  }
  if (r.repairs.length) {
    out.push(`${dry ? "would repair" : "repaired"} ${r.repairs.length} DB row set(s):`);
    for (const x of r.repairs) out.push(`  - ${x.kind}: ${x.detail}`);
  }
  if (r.detached.length) {
    out.push(`detached snapshots, kept — need re-attach (${r.detached.length}) [needs a human]:`);
    for (const d of r.detached) out.push(`  - ${what(d.thin_id, d.device)}: ${d.detail}`);
  }
  if (r.foreign.length) {
    out.push(`foreign (never touched) (${r.foreign.length}):`);
    for (const f of r.foreign) out.push(`  - ${f.name}: ${f.detail}`);
  }
  for (const k of r.kernel_messages) out.push(`kernel, while unmounting a device then removed: ${k}`);
  for (const n of r.notes) out.push(`note: ${n}`);
  if (r.stopped) out.push(`STOPPED: ${r.stopped.detail}`);
  const s = r.summary;
  out.push(
    dry
      ? `summary: ${s.orphans} to remove, ${s.skipped} left alone, ${s.repairs} repair(s), ${s.detached} detached, ${s.foreign} foreign${s.needs_human ? "; needs a human" : ""}`
      : `summary: ${s.removed} removed, ${s.skipped} left alone, ${s.failed} failed, ${s.not_run} not run, ${s.repairs} repair(s), ${s.detached} detached${s.needs_human ? "; needs a human" : ""}`,
  );
  return `${out.join("\n")}\n`;
}
