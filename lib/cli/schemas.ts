// The documented shape of every command's --json output (stable snake_case keys), one schema per
// command, and the error envelope every command prints instead when it fails. printJson checks a
// document against its schema when THINIMG_CHECK_JSON=1 (the test runner sets it, so every --json
// output any test produces is validated); the schemas are the reference for anyone parsing them.
import * as v from "valibot";

const str = v.string();
const int = v.pipe(v.number(), v.integer());
const num = v.number();
const bool = v.boolean();
const n = <T extends v.GenericSchema>(s: T) => v.nullable(s);
const obj = v.strictObject;
/** Free-form (checks' details, image labels, kernel findings): keys are data, not ours. */
const any = v.unknown();

export const ErrorEnvelope = obj({
  ok: v.literal(false),
  error: obj({ kind: str, message: str, hint: n(str), details: v.optional(v.record(str, any)) }),
  /** The failed command's document so far, in its own keys (unpack: image + layers built). */
  partial: v.optional(v.record(str, any)),
});

const LayerStats = obj({ entries: int, bytes: int, whiteouts: int, skipped: int, holes: int, duration_ms: num });

export const UnpackOutput = obj({
  ok: v.literal(true),
  image: obj({ id: int, name: str, source: str, format: n(str), state: str }),
  layers: v.array(obj({ index: int, chain_id: str, thin_id: int, device_name: str, reused: bool, stats: n(LayerStats) })),
  built: int,
  reused: int,
  dm_work: bool,
  waited: bool,
  duration_ms: num,
});

const Activated = { snapshot_id: int, image: str, thin_id: int, device_name: str, device_path: str, duration_ms: num };
const Reattached = { ...Activated, outcome: v.picklist(["reattached", "already_attached", "would_reattach", "failed", "not_run"]), error: n(str) };

export const ActivateOutput = v.union([obj({ ok: v.literal(true), ...Activated }), obj({ ok: v.literal(true), ...Reattached })]);

export const ReleaseOutput = obj({
  ok: v.literal(true),
  snapshot_id: int,
  device_name: n(str),
  state: v.picklist(["released", "already_released"]),
  duration_ms: num,
});

export const ListOutput = obj({
  ok: v.literal(true),
  pool: obj({
    name: str,
    status: v.picklist(["ok", "fail", "error", "unavailable"]),
    detail: n(str),
    transaction_id: n(int),
    data_used_pct: n(num),
    meta_used_pct: n(num),
    data_used_blocks: n(int),
    data_total_blocks: n(int),
    mode: n(str),
  }),
  images: v.array(
    obj({
      id: int,
      name: str,
      state: str,
      source: str,
      format: n(str),
      layers: int,
      top_chain_id: n(str),
      ready_at: n(str),
      error: n(str),
      exclusive_bytes: n(int),
      last_activated_at: n(str),
      active_snapshots: int,
    }),
  ),
  space_detail: n(str),
  layers: v.array(
    obj({
      id: int,
      chain_id: str,
      state: str,
      phase: str,
      thin_id: n(int),
      device_name: n(str),
      images: int,
      entries: n(int),
      bytes: n(int),
      committed_at: n(str),
      error: n(str),
    }),
  ),
  snapshots: v.array(
    obj({
      id: int,
      image: str,
      state: str,
      thin_id: n(int),
      device_name: n(str),
      device_path: n(str),
      activated_at: n(str),
      released_at: n(str),
      error: n(str),
    }),
  ),
  thin_ids: v.record(str, int),
});

const Detail = obj({ reason: str, detail: str });
export const GcOutput = obj({
  ok: bool,
  exit_code: v.picklist([0, 1]),
  mode: v.picklist(["dry_run", "force"]),
  pool: str,
  state_dir: str,
  grace_ms: num,
  started_at: str,
  duration_ms: num,
  lock: obj({ status: str, holder: n(str) }),
  health: n(obj({ ok: bool, detail: str })),
  refused: n(Detail),
  reconciled: int,
  scan: obj({
    devices_ours: int,
    devices_foreign: int,
    devices_unrelated: int,
    metadata_status: str,
    metadata_method: n(str),
    metadata_thin_ids: n(int),
    metadata_skipped: n(str),
    stale_metadata_hold: n(obj({ held_root: int, released: bool })),
    db_known: bool,
  }),
  orphans: v.array(
    obj({
      thin_id: n(int),
      device: n(str),
      reason: str,
      detail: str,
      age_ms: n(num),
      mapped_bytes: n(num),
      commands: v.array(str),
      outcome: str,
      skip_reason: n(str),
      steps: v.array(obj({ op: str, target: str, outcome: str, duration_ms: num, error: n(str) })),
    }),
  ),
  skipped: v.array(obj({ thin_id: n(int), device: n(str), reason: str, orphan_reason: str, detail: str, needs_human: bool })),
  repairs: v.array(obj({ kind: str, thin_id: n(int), device: n(str), path: n(str), detail: str, applied: bool })),
  detached: v.array(obj({ snapshot_id: n(int), thin_id: int, device: str, detail: str })),
  foreign: v.array(obj({ name: str, thin_id: n(int), why: str, detail: str })),
  stopped: n(Detail),
  kernel_messages: v.array(str),
  notes: v.array(str),
  summary: obj({
    orphans: int,
    removed: int,
    skipped: int,
    failed: int,
    not_run: int,
    repairs: int,
    detached: int,
    foreign: int,
    needs_human: bool,
    mapped_bytes: num,
  }),
});

export const HealthOutput = obj({
  ok: bool,
  healthy: bool,
  pool: n(str),
  duration_ms: num,
  checks: v.array(
    obj({ name: str, status: v.picklist(["ok", "warn", "block"]), message: str, runbook: str, duration_ms: num, details: v.optional(v.record(str, any)) }),
  ),
  thresholds: v.record(str, num),
  acknowledged: v.optional(v.array(obj({ boot_id: str, seq: int, what: str, line: str }))),
});

const ImageConfigJson = obj({
  digest: str,
  architecture: n(str),
  os: n(str),
  variant: n(str),
  env: v.array(str),
  entrypoint: n(v.array(str)),
  cmd: n(v.array(str)),
  working_dir: n(str),
  user: n(str),
  labels: v.record(str, str),
  diff_ids: n(v.array(str)),
});

export const ExtractOutput = obj({
  ok: v.literal(true),
  source: str,
  dest: str,
  format: str,
  name: n(str),
  id: n(str),
  platform: n(str),
  layers: v.array(obj({ digest: str, diff_id: n(str), compression: str, size: int, entries: int, bytes: int, whiteouts: int, skipped: int, seconds: num })),
  entries: int,
  bytes: int,
  whiteouts: int,
  skipped: int,
  seconds: num,
  config: n(ImageConfigJson),
});

const ReattachReport = obj({
  ok: bool,
  pool: str,
  dry_run: bool,
  skipped: n(str),
  snapshots: v.array(obj(Reattached)),
  error: n(obj({ kind: str, message: str, hint: n(str) })),
  summary: obj({ active: int, reattached: int, already_attached: int, failed: int, not_run: int }),
});

export const RecoverPoolOutput = obj({
  ok: bool,
  pool: n(str),
  dir: str,
  action: v.picklist(["created", "recovered", "grown", "healthy", "blocked"]),
  dry_run: bool,
  steps: v.array(obj({ name: str, status: str, argv: n(v.array(str)), command: n(str), detail: n(str) })),
  status: n(v.record(str, any)),
  devices: obj({ metadata: n(str), data: n(str) }),
  error: n(obj({ kind: str, message: str, hint: n(str) })),
  next_steps: v.array(str),
  exit_code: int,
  reattach: n(ReattachReport),
});

const RemovedImage = obj({
  id: int,
  name: str,
  state: v.picklist(["removed", "already_removed", "skipped"]),
  skip_reason: n(str),
  released_layers: v.array(obj({ id: int, chain_id: str, thin_id: n(int) })),
  shared_layers: int,
  active_snapshots: int,
});

export const RemoveOutput = obj({ ok: v.literal(true), images: v.array(RemovedImage), duration_ms: num });

const PruneEntry = obj({ id: int, name: str, group: str, last_used_at: str, keep_reason: n(str) });
export const PruneOutput = obj({
  ok: v.literal(true),
  dry_run: bool,
  now: str,
  unused_for_ms: n(num),
  keep_last: n(int),
  prune: v.array(PruneEntry),
  kept: v.array(PruneEntry),
  freed_bytes: n(num),
  freed_blocks: n(int),
  space_detail: n(str),
  removed: v.array(RemovedImage),
  duration_ms: num,
});

/** The schema of each command's --json document (docs/architecture.md points here). */
export const OUTPUT_SCHEMAS = {
  unpack: UnpackOutput,
  activate: ActivateOutput,
  release: ReleaseOutput,
  list: ListOutput,
  gc: GcOutput,
  health: HealthOutput,
  extract: ExtractOutput,
  "recover-pool": RecoverPoolOutput,
  remove: RemoveOutput,
  prune: PruneOutput,
} as const;

export type CommandName = keyof typeof OUTPUT_SCHEMAS;

/** Why `doc` is not `command`'s documented output (first issues, with their paths), or null. */
export function outputProblems(command: CommandName | "error", doc: unknown): string | null {
  const schema = command === "error" ? ErrorEnvelope : OUTPUT_SCHEMAS[command];
  const r = v.safeParse(schema, doc);
  if (r.success) return null;
  return r.issues
    .slice(0, 5)
    .map((i) => `${v.getDotPath(i) ?? "(root)"}: ${i.message}`)
    .join("; ");
}
