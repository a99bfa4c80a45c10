// Build one layer device, as a resumable state machine. layers.phase is the last completed step;
// each step writes its intent (steps row) first and records the outcome with the phase change in one
// transaction. A later run resumes from the phase after checking the real device, mount and ledger:
//
//   new → allocated (thin id from the ledger)
//       → created   (create_thin, or create_snap of the INACTIVE parent device: no suspend needed)
//       → activated (dmsetup create <prefix>-<pool>-layer-<id>)
//       → formatted (mkfs.ext4, base layer only)
//       → mounted   (nosuid,nodev under <stateDir>/mnt)
//       → applied   (applyLayer, then `sync -f`: `applied` means the layer is on disk)
//       → unmounted (umount) → deactivated (dmsetup remove)
//       → committed (only while the ledger still says the thin id is `created`)
//
// An apply that was interrupted cannot be trusted (half a layer): that attempt is abandoned — its
// thin id, device and mount are recorded as leaked for GC — and a fresh thin id is built instead.
// So is an `applied` attempt whose flush is not proven or whose filesystem a reboot left unclean.
// A reboot also drops the device: `activated`/`formatted` found without it are re-activated.

import { mkdirSync } from "node:fs";
import { activeDevice } from "../dm/active.ts";
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError, runTool } from "../dm/errors.ts";
import { mkfsExt4 } from "../dm/mkfs.ts";
import * as mnt from "../dm/mount.ts";
import * as pool from "../dm/pool.ts";
import { ThinimgError } from "../errors.ts";
import { applyLayerRef } from "../image/apply-layer.ts";
import type { LayerRef } from "../image/types.ts";
import { log } from "../log.ts";
import type { Ctx } from "../pool/context.ts";
import { inPoolSection, poolCreate, ThinIdTaken } from "../pool/journal.ts";
import { deviceName, mountPathFor } from "../pool/names.ts";
import { pausePoint } from "../pool/pause-points.ts";
import { tx } from "../store/db.ts";
import { setDevice, setDeviceState } from "../store/devices.ts";
import { workSubject } from "../store/keys.ts";
import { abandonLayerAttempt, getLayer, getLayerByChain, type LayerPhase, type LayerRow, updateLayer } from "../store/layers.ts";
import { setMount, setMountState } from "../store/mounts.ts";
import { allocateThinId, getThinId, setThinIdState } from "../store/thin-ids.ts";
import { beginStep, endStep, finishWork, type Leak, startWork, stepDone, stepsOf } from "../store/work.ts";
import { chainIdOf, identityOf, isProvisionalChainId } from "./chain.ts";
import { classify, failure } from "./failure.ts";
import { retryBusyOnce } from "./retry.ts";

/** ext4 options while a layer is applied: hostile content can't use setuid or device nodes on the
 * host; errors make the fs read-only at once instead of continuing on a failing device. */
export const APPLY_MOUNT_OPTIONS = ["nosuid", "nodev", "noatime", "errors=remount-ro"];
const MAX_ID_TRIES = 16;

export interface BuildInput {
  layerId: number;
  parent: LayerRow | null;
  ref: LayerRef;
  /** "2/5 (sha256:ab12…)" for messages. */
  label: string;
}

export interface BuildResult {
  layer: LayerRow;
  /** Attempts abandoned before this one succeeded (crash resume). */
  abandoned: number;
  /** false: another process had committed it by the time we held its lock. */
  built: boolean;
}

const LIVE_THIN = new Set(["allocated", "created"]);

/** Resources the current attempt holds right now, judged from the phase (for failure records). */
function heldResources(l: LayerRow, mountPath: string | null): Leak[] {
  const leaks: Leak[] = [];
  const order: LayerPhase[] = ["new", "allocated", "created", "activated", "formatted", "mounted", "applied", "unmounted", "deactivated", "committed"];
  const at = order.indexOf(l.phase);
  // an id whose create never succeeded is not a leak (the re-run creates that same id)
  if (l.thin_id !== null && at >= order.indexOf("created"))
    leaks.push({ kind: "thin_id", ref: l.thin_id, reason: `layer ${l.chain_id} build failed at ${l.phase}` });
  if (l.device_name && at >= order.indexOf("activated") && at < order.indexOf("deactivated"))
    leaks.push({ kind: "device", ref: l.device_name, reason: "layer build failed" });
  if (mountPath && at >= order.indexOf("mounted") && at < order.indexOf("unmounted"))
    leaks.push({ kind: "mount", ref: mountPath, reason: "layer build failed" });
  return leaks;
}

/** One build attempt's state and the bookkeeping every step shares. */
class Build {
  l: LayerRow;
  mountPath: string | null = null;
  abandoned = 0;
  /** Phase to return to after a re-activation (a reboot dropped the device; its data is intact). */
  resumeAt: LayerPhase | null = null;
  /** The step whose intent is written but whose outcome is not: ended `failed` on an error (a record,
   * not a cleanup), so it never looks like the work of a dead process. */
  openStep: { id: number; name: string } | null = null;
  readonly pool: string;

  constructor(
    readonly ctx: Ctx,
    readonly input: BuildInput,
    readonly workId: number,
  ) {
    this.pool = ctx.cfg.pool;
    this.l = getLayer(ctx.db, input.layerId)!;
    this.reload();
  }

  get db() {
    return this.ctx.db;
  }
  /** The device name, once the thin id is allocated. */
  get dev(): string {
    return this.l.device_name!;
  }
  get cmdCtx() {
    return { pool_name: this.pool, device_id: this.l.thin_id!, device_name: this.l.device_name! };
  }
  reload(): void {
    this.l = getLayer(this.db, this.input.layerId)!;
    this.mountPath = this.l.device_name ? mountPathFor(this.ctx.cfg.mountDir, this.l.device_name) : null;
  }
  setPhase(phase: LayerPhase, extra: Parameters<typeof updateLayer>[2] = {}): void {
    updateLayer(this.db, this.l.id, { phase, ...extra });
    this.reload();
  }
  pause(point: string): Promise<void> {
    return pausePoint(point, this.ctx.cfg.stateDir);
  }
  /** Write a step's intent, with the rows it concerns (`with`), in one transaction: every commit is
   * an fsync, which costs ms on a slow disk. */
  begin(name: string, with_?: () => void): void {
    const st = tx(this.db, () => {
      with_?.();
      return beginStep(this.db, this.workId, this.pool, name, { thinId: this.l.thin_id, deviceName: this.l.device_name });
    });
    this.openStep = { id: st.id, name };
  }
  /** Record the open step's outcome, the rows it concerns (`with`) and the phase it reached: one
   * transaction (a crash never leaves a done step without its phase). */
  finish(outcome: string, phase: LayerPhase, with_?: () => void): void {
    tx(this.db, () => {
      with_?.();
      this.end(outcome);
      updateLayer(this.db, this.l.id, { phase });
    });
    this.reload();
  }
  end(outcome: string): void {
    if (this.openStep) endStep(this.db, this.openStep.id, "done", outcome);
    this.openStep = null;
  }
  /** Give up on the current thin id: everything it holds is left in place and recorded for GC. */
  abandon(why: string): void {
    tx(this.db, () => abandonLayerAttempt(this.db, this.pool, this.l, why, this.mountPath));
    log.warn(`layer ${this.input.label}: abandoning thin id ${this.l.thin_id} (${why}); its leftovers are recorded for \`bun scripts/gc.ts\``);
    this.abandoned++;
    this.reload();
  }
}

const isMounted = (path: string | null) => path !== null && mnt.mountinfo().some((m) => m.mountPoint === path);

/** On (re-)entry: check what the recorded phase claims against the ledger, the device and the mount. */
async function checkOnEntry(b: Build): Promise<void> {
  const l = b.l;
  if (l.thin_id === null) {
    if (l.phase !== "new") b.setPhase("new");
    return;
  }
  const t = getThinId(b.db, b.pool, l.thin_id);
  if (!t || !LIVE_THIN.has(t.state)) b.abandon(`its thin id is ${t?.state ?? "missing from the ledger"}`);
  else if (l.phase === "allocated" && t.state === "created") b.setPhase("created");
  else if (l.phase === "mounted") b.abandon("a previous apply was interrupted; a half-applied layer is never reused");
  else if (l.phase === "activated" || l.phase === "formatted") {
    // after a reboot the device is gone (its thin id and data are not): load it again
    if (!(await activeDevice(b.dev))) {
      log.info(`layer ${b.input.label}: device ${b.dev} is not active (host restarted?); re-activating thin id ${l.thin_id}`);
      b.resumeAt = l.phase;
      b.setPhase("created");
    }
  } else if (l.phase === "applied") {
    // `applied` is written only after `sync -f` succeeded; a row without that proof (an older
    // thinimg, or a failed flush) is never committed: a fresh syncfs would not report the earlier
    // write error. Without mount AND device the host restarted before the unmount: the filesystem
    // was never cleanly unmounted (its journal not replayed), so not adopted.
    if (!stepDone(b.db, b.pool, "sync", l.thin_id)) b.abandon("its writes were never proven flushed (no successful `sync -f`)");
    else if (!isMounted(b.mountPath) && !(await activeDevice(b.dev)))
      b.abandon("the host restarted before it was unmounted; an uncleanly unmounted layer is never reused");
  }
}

/** new → allocated: the id and the layer's claim on it in one transaction (a crash leaks nothing). */
async function allocate(b: Build): Promise<void> {
  const { db, pool, l, ctx } = b;
  tx(db, () => {
    const id = allocateThinId(db, pool, { kind: "layer", id: l.id }, b.input.parent?.thin_id ?? null);
    updateLayer(db, l.id, { phase: "allocated", thin_id: id, device_name: deviceName(ctx.cfg.prefix, pool, "layer", id), attempt: l.attempt + 1 });
  });
  b.reload();
  await b.pause("layer:allocated");
}

/** Inside a pool section: create_thin, or create_snap of the INACTIVE parent (no suspend needed).
 * The section began by settling dead processes' intents: this id may have just been proven created
 * (resume) or found in the pool unproven (orphaned: never adopted). */
async function createInPool(b: Build, thinId: number): Promise<"created" | "gone" | null> {
  const t = getThinId(b.db, b.pool, thinId);
  if (t?.state === "created") return "created";
  if (t?.state !== "allocated") return "gone";
  const parent = b.input.parent;
  if (!parent) {
    await poolCreate(b.ctx, b.workId, { op: "create_thin", thinId });
    return null;
  }
  if (await activeDevice(parent.device_name!)) {
    throw new ThinimgError("conflict", `parent layer device ${parent.device_name} is active; refusing to snapshot it without a suspend`, {
      hint: "it is not in use by thinimg; check who holds it, then `bun scripts/gc.ts`",
    });
  }
  await poolCreate(b.ctx, b.workId, { op: "create_snap", thinId, originId: parent.thin_id! });
  return null;
}

/** allocated → created (or back to new when the id turned out to exist already). */
async function create(b: Build): Promise<void> {
  const thinId = b.l.thin_id!;
  let settled: "created" | "gone" | null;
  try {
    settled = await inPoolSection(b.ctx, () => createInPool(b, thinId));
  } catch (e) {
    if (!(e instanceof ThinIdTaken)) throw e;
    if (b.l.attempt >= MAX_ID_TRIES) {
      throw new ThinimgError("conflict", `pool ${b.pool}: ${MAX_ID_TRIES} thin ids in a row already existed`, {
        hint: "the pool has devices thinimg did not record; run `bun scripts/gc.ts`",
      });
    }
    b.setPhase("new", { thin_id: null, device_name: null });
    return;
  }
  if (settled === "gone") return b.abandon("an interrupted create of it could not be proven");
  b.setPhase("created");
  await b.pause("layer:created");
}

/** created → activated (or back to the phase a reboot interrupted). */
async function activateDevice(b: Build): Promise<void> {
  b.begin("activate_device", () => setDevice(b.db, { pool: b.pool, name: b.dev, thinId: b.l.thin_id!, kind: "layer", state: "activating" }));
  await ensureActive(b.pool, b.dev, b.l.thin_id!, b.l.virtual_size);
  const next = b.resumeAt ?? "activated";
  b.finish(b.resumeAt ? `ok (re-activated; resuming at ${b.resumeAt})` : "ok", next, () => setDeviceState(b.db, b.pool, b.dev, "active"));
  b.resumeAt = null;
  if (next === "activated") await b.pause("layer:activated");
}

/** activated → formatted: mkfs.ext4 on a base layer; a child inherits its parent's filesystem. */
async function format(b: Build): Promise<void> {
  if (b.input.parent) b.setPhase("formatted");
  else {
    b.begin("mkfs");
    b.ctx.progress?.stage(`layer ${b.input.label}: mkfs`);
    await mkfsExt4(dmsetup.mapperPath(b.dev), { ctx: b.cmdCtx });
    b.finish("ok", "formatted");
  }
  await b.pause("layer:formatted");
}

/** formatted → mounted (nosuid,nodev under <stateDir>/mnt); a mount of this very device is adopted. */
async function mountDevice(b: Build): Promise<void> {
  const path = mountPathFor(b.ctx.cfg.mountDir, b.dev);
  mkdirSync(path, { recursive: true, mode: 0o700 });
  b.begin("mount", () => setMount(b.db, { path, pool: b.pool, deviceName: b.dev, thinId: b.l.thin_id!, purpose: "apply", state: "mounting" }));
  const info = await activeDevice(b.dev);
  const mm = info ? `${info.major}:${info.minor}` : null;
  const already = mnt.mountinfo().filter((m) => m.mountPoint === path);
  if (already.length > 0) {
    if (!mm || !already.every((m) => m.majorMinor === mm)) {
      throw new ThinimgError("conflict", `${path} is already mounted by something else`, { hint: "check `findmnt`; then `bun scripts/gc.ts`" });
    }
  } else {
    await mnt.mount(dmsetup.mapperPath(b.dev), path, { fstype: "ext4", options: APPLY_MOUNT_OPTIONS, ctx: b.cmdCtx });
  }
  b.finish("ok", "mounted", () => setMountState(b.db, path, "mounted"));
  await b.pause("layer:mounted");
}

/** mounted → applied: apply the layer, then prove it is on disk. */
async function applyAndSync(b: Build): Promise<void> {
  const { ctx, input } = b;
  const path = b.mountPath!;
  b.begin("apply");
  ctx.progress?.stage(`layer ${input.label}: apply`);
  const stats = await applyLayerRef(input.ref, path, {
    devices: true,
    sameOwner: true,
    layerLabel: input.label,
    limits: {
      maxEntries: ctx.cfg.limits.maxEntries,
      maxTotalBytes: ctx.cfg.limits.maxLayerBytes,
      maxFileBytes: ctx.cfg.limits.maxFileBytes,
      maxDepth: ctx.cfg.limits.maxDepth,
      maxPathBytes: ctx.cfg.limits.maxPathBytes,
    },
    onProgress: (n) => ctx.progress?.bytes(n, null),
  });
  // a layer built under a provisional chain id learnt its digest from this read
  const named = isProvisionalChainId(b.l.chain_id) ? { digest: input.ref.digest, diff_id: input.ref.diffId } : {};
  tx(b.db, () => {
    b.end(`entries=${stats.entries} bytes=${stats.bytes} whiteouts=${stats.whiteouts}`);
    updateLayer(b.db, b.l.id, { stats: JSON.stringify(stats), ...named });
  });
  await b.pause("layer:written"); // fault tests: applied to the page cache, not yet flushed
  // syncfs before `applied`: a write error (I/O error, pool out of space) surfaces here and the
  // attempt fails in `mounted` (never resumed). umount does not report such errors, and a later
  // syncfs only reports errors newer than its open (Linux >= 5.8), so this is the one chance to know
  // the layer is on disk. The `sync` step row is the proof a resume checks.
  b.begin("sync");
  await runTool(["sync", "-f", path], { timeoutMs: 300_000, ctx: b.cmdCtx });
  tx(b.db, () => {
    b.end("ok");
    updateLayer(b.db, b.l.id, { phase: "applied" });
  });
  b.reload();
  await b.pause("layer:applied");
}

/** applied → unmounted (the data was flushed, and the flush checked, before `applied`). */
async function unmount(b: Build): Promise<void> {
  const path = b.mountPath!;
  const wasMounted = isMounted(path);
  b.begin("umount", wasMounted ? () => setMountState(b.db, path, "unmounting") : undefined);
  if (wasMounted) await retryBusyOnce(`umount ${path}`, () => mnt.umount(path, { ctx: b.cmdCtx }));
  b.finish(wasMounted ? "ok" : "was not mounted", "unmounted", () => setMountState(b.db, path, "unmounted"));
  await b.pause("layer:unmounted");
}

/** unmounted → deactivated: committed layers are kept inactive (snapshots need no suspend). */
async function deactivate(b: Build): Promise<void> {
  const dev = b.dev;
  b.begin("remove_device", () => setDeviceState(b.db, b.pool, dev, "removing"));
  const info = await activeDevice(dev);
  if (info) await retryBusyOnce(`dmsetup remove ${dev}`, () => dmsetup.remove(dev, { ctx: { pool_name: b.pool, device_id: b.l.thin_id! } }));
  b.finish(info ? "ok" : "was not active", "deactivated", () => setDeviceState(b.db, b.pool, dev, "removed"));
  await b.pause("layer:deactivated");
}

/** deactivated → committed: only while the ledger still says `created`, in the same transaction
 * (GC may have started deleting this id: a failed layer's id looks unused to it). */
async function commit(b: Build): Promise<void> {
  const { db, pool, l } = b;
  tx(db, () => {
    const t = getThinId(db, pool, l.thin_id!);
    if (t?.state !== "created") {
      throw new ThinimgError("conflict", `its thin id ${l.thin_id} is ${t?.state ?? "missing from the ledger"} (GC claimed it?); the layer is not committed`, {
        hint: "re-run the unpack: it builds the layer on a fresh thin id",
      });
    }
    setThinIdState(db, pool, l.thin_id!, "committed");
    updateLayer(db, l.id, { phase: "committed", state: "committed", committed_at: Date.now(), error: null, error_kind: null, ...realChain(b) });
    finishWork(db, b.workId, "done");
  });
  b.reload();
}

/** A layer built under a provisional chain id commits under its real one (call inside the commit
 * transaction). Another process may have committed the same bytes meanwhile: then this build is not
 * committed (its device is left for GC), and a re-run reuses that layer. */
function realChain(b: Build): { chain_id: string; identity: string } | Record<string, never> {
  const l = b.l;
  if (!isProvisionalChainId(l.chain_id)) return {};
  if (isProvisionalChainId(l.digest)) throw new ThinimgError("internal", `layer ${b.input.label}: applied but its digest was not recorded`);
  const identity = identityOf({ diffId: l.diff_id, digest: l.digest });
  const chainId = chainIdOf(l.parent_chain_id, identity);
  if (getLayerByChain(b.db, b.pool, chainId)) {
    throw new ThinimgError("conflict", `the same layer (${chainId}) was built meanwhile by another unpack; this copy is not committed`, {
      hint: "re-run the unpack: it reuses that layer",
    });
  }
  return { chain_id: chainId, identity };
}

/** What follows what: the step that leaves each phase. The one place the order is written down. */
const STEPS: Record<Exclude<LayerPhase, "committed">, (b: Build) => Promise<void>> = {
  new: allocate,
  allocated: create,
  created: activateDevice,
  activated: format,
  formatted: mountDevice,
  mounted: applyAndSync,
  applied: unmount,
  unmounted: deactivate,
  deactivated: commit,
};

/** Fail dumb: record the failure and everything the attempt holds; nothing is undone. */
async function recordFailure(b: Build, e: unknown): Promise<ThinimgError> {
  const { db, pool, l, mountPath } = b;
  const leaks = heldResources(l, mountPath);
  // a create whose outcome is unknown (timeout) stays pending for the next run to settle; until
  // then its id may exist in the pool
  if (
    l.thin_id !== null &&
    !leaks.some((x) => x.kind === "thin_id") &&
    stepsOf(db, b.workId).some((s) => s.state === "pending" && s.thin_id === l.thin_id && s.name.startsWith("create_"))
  ) {
    leaks.push({ kind: "thin_id", ref: l.thin_id, reason: `layer ${l.chain_id}: outcome of its create is unknown (settled by the next run)` });
  }
  let c = classify(e);
  let override: { message: string } | undefined;
  if (c.errorKind !== "policy" && c.errorKind !== "input" && (await poolOutOfSpace(b.ctx))) {
    c = { kind: "dm", errorKind: "no_space" };
    override = { message: `pool ${pool} ran out of data space (${(e as Error).message})` };
  }
  const err = failure(`layer ${b.input.label}`, e, leaks, override);
  tx(db, () => {
    if (b.openStep) endStep(db, b.openStep.id, "failed", "error", err.message);
    updateLayer(db, l.id, { state: "failed", error: err.message, error_kind: c.errorKind });
    if (l.device_name && leaks.some((x) => x.kind === "device")) setDeviceState(db, pool, l.device_name, "leaked", err.message);
    if (mountPath && leaks.some((x) => x.kind === "mount")) setMountState(db, mountPath, "leaked", err.message);
    finishWork(db, b.workId, "failed", { error: err.message, kind: c.errorKind, leaks });
  });
  return err;
}

export async function buildLayer(ctx: Ctx, input: BuildInput): Promise<BuildResult> {
  const first = getLayer(ctx.db, input.layerId)!;
  if (first.state === "committed") return { layer: first, abandoned: 0, built: false };
  const work = startWork(ctx.db, ctx.cfg.pool, "build_layer", workSubject("layer", first.id), ctx.owner);
  const b = new Build(ctx, input, work.id);
  try {
    b.setPhase(b.l.phase, { state: "building" });
    await checkOnEntry(b);
    while (b.l.phase !== "committed") {
      const step = STEPS[b.l.phase];
      if (!step) throw new ThinimgError("internal", `layer ${b.l.id}: unknown phase ${b.l.phase}`);
      await step(b);
    }
    return { layer: b.l, abandoned: b.abandoned, built: true };
  } catch (e) {
    throw await recordFailure(b, e);
  }
}

/** Load the thin table; if the name exists already it must map exactly this thin id (a resumed run). */
async function ensureActive(poolName: string, name: string, thinId: number, size: number): Promise<void> {
  try {
    await pool.activateThin(poolName, name, thinId, size);
    return;
  } catch (e) {
    if (!isDmError(e, "exists")) throw e;
  }
  await pool.assertThinDevice(poolName, name, thinId);
}

async function poolOutOfSpace(ctx: Ctx): Promise<boolean> {
  try {
    const st = await pool.poolStatus(ctx.cfg.pool);
    return st.kind === "ok" && (st.mode === "out_of_data_space" || st.dataUsed >= st.dataTotal);
  } catch {
    return false;
  }
}
