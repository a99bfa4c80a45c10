// Activation: a fresh thin snapshot of the image's top layer per request, loaded as
// /dev/mapper/<prefix>-<pool>-snap-<id>. The top layer device is inactive (committed layers are
// deactivated), so create_snap needs no suspend. Release deactivates and marks the snapshot released;
// deleting its thin id is GC's job.
import { activeDevice } from "../dm/active.ts";
import * as dmsetup from "../dm/dmsetup.ts";
import * as mnt from "../dm/mount.ts";
import * as pool from "../dm/pool.ts";
import { quoted, ThinimgError } from "../errors.ts";
import { withHostQueue } from "../lock/host-queue.ts";
import type { Ctx } from "../pool/context.ts";
import { beginCreateStep, inPoolSection, poolCreate, ThinIdTaken } from "../pool/journal.ts";
import { deviceName, parseDeviceName } from "../pool/names.ts";
import { pausePoint } from "../pool/pause-points.ts";
import { tx } from "../store/db.ts";
import { getDevice, setDevice, setDeviceState } from "../store/devices.ts";
import { getImage, getImageByName, type ImageRow } from "../store/images.ts";
import { workSubject } from "../store/keys.ts";
import { getLayer, type LayerRow } from "../store/layers.ts";
import { getSnapshot, getSnapshotByDevice, insertSnapshot, type SnapshotRow, updateSnapshot } from "../store/snapshots.ts";
import { allocateThinId, getThinId, setThinIdState } from "../store/thin-ids.ts";
import { beginStep, endStep, finishWork, type Leak, startWork, type WorkRow } from "../store/work.ts";
import { classify, failure } from "./failure.ts";
import { assertSnapshotSize, growExt4 } from "./grow.ts";
import { type Preflight, preflight } from "./preflight.ts";
import { isTimeout, retryBusyOnce } from "./retry.ts";

export interface ActivateResult {
  snapshot_id: number;
  image: string;
  thin_id: number;
  device_name: string;
  device_path: string;
  duration_ms: number;
}

export function findImage(ctx: Ctx, ref: string): ImageRow {
  const img = getImageByName(ctx.db, ctx.cfg.pool, ref) ?? (/^\d+$/.test(ref) ? getImage(ctx.db, Number(ref)) : null);
  if (!img || img.pool !== ctx.cfg.pool) {
    throw new ThinimgError("input", `no image ${quoted(ref)} in pool ${ctx.cfg.pool}`, {
      hint: "see `bun scripts/list.ts`; unpack it first with `bun scripts/unpack.ts SOURCE --name NAME`",
    });
  }
  return img;
}

export interface ActivateOptions {
  /** Skip the pre-flight health checks (benchmarks measure them separately). */
  skipHealth?: boolean;
  /** Bytes: a snapshot larger than the image, its ext4 grown to fill it (lib/pipeline/grow.ts). */
  size?: number | undefined;
  /** The pre-flight to run before the dm work (default: the synchronous checks; the service passes
   * its gate on the background checks, lib/server/health-gate.ts). */
  preflight?: Preflight | undefined;
}

/** The activation's progress, read by the failure path to record exactly what was left behind. */
interface ActivationProgress {
  thinId: number | null;
  name: string | null;
  created: boolean;
  active: boolean;
  /** the create_snap intent while this code is to close it (`done` once created, else `failed`);
   * null while poolCreate owns it (it closes it, or leaves it pending when the outcome is unknown) */
  createStep: number | null;
  /** the device's intent until it is closed (ended `failed` on an error: recording only) */
  openStep: number | null;
}

/** The image's committed top layer, or a conflict error if the image cannot be activated. */
function readyTopLayer(ctx: Ctx, img: ImageRow): LayerRow {
  if (img.state !== "ready" || img.top_layer_id === null) {
    throw new ThinimgError("conflict", `image ${img.name} is ${img.state}${img.error ? ` (${img.error})` : ""}`, {
      hint: `unpack it first: bun scripts/unpack.ts ${img.source} --name ${img.name}`,
    });
  }
  const top = getLayer(ctx.db, img.top_layer_id)!;
  if (top.state !== "committed" || top.thin_id === null || !top.device_name) {
    throw new ThinimgError("conflict", `image ${img.name}: its top layer is ${top.state}`, { hint: "re-run the unpack" });
  }
  return top;
}

export async function activate(ctx: Ctx, imageRef: string, o: ActivateOptions = {}): Promise<ActivateResult> {
  const t0 = performance.now();
  const { db } = ctx;
  const poolName = ctx.cfg.pool;
  const img = findImage(ctx, imageRef);
  const top = readyTopLayer(ctx, img);
  const size = o.size === undefined ? top.virtual_size : assertSnapshotSize(o.size, top.virtual_size, img.name);
  if (!o.skipHealth) await (o.preflight ?? preflight)(ctx);
  // one commit (each is an fsync with synchronous=FULL): the snapshot row, its work record, its thin
  // id and the intents of both dm commands — all durable before the pool section sends anything
  const [snap, work, first] = tx(db, () => {
    const sn = insertSnapshot(db, { pool: poolName, imageId: img.id, layerId: top.id, virtualSize: size, pid: ctx.owner.pid, command: ctx.owner.command });
    const w = startWork(db, poolName, "activate", workSubject("snapshot", sn.id), ctx.owner);
    return [sn, w, claimThinId(ctx, top, sn, w)] as const;
  });
  const st: ActivationProgress = { ...first, created: false, active: false };
  try {
    await inPoolSection(ctx, () => activateInPool(ctx, top, snap, work, size, st));
  } catch (e) {
    throw await recordActivateFailure(ctx, img, snap, work, st, e);
  }
  return {
    snapshot_id: snap.id,
    image: img.name,
    thin_id: st.thinId!,
    device_name: st.name!,
    device_path: dmsetup.mapperPath(st.name!),
    duration_ms: Math.round(performance.now() - t0),
  };
}

interface Claim {
  thinId: number;
  name: string;
  createStep: number;
  openStep: number;
}

/** In the caller's transaction: the next thin id and the snapshot's claim on it (a crash can never
 * leave an allocated id nothing points at), the create_snap intent, and the device's intent (its
 * step and `activating` row): after a crash, reconcilePending and GC settle both from these rows. */
function claimThinId(ctx: Ctx, top: LayerRow, snap: SnapshotRow, work: WorkRow): Claim {
  const { db, cfg } = ctx;
  const thinId = allocateThinId(db, cfg.pool, { kind: "snapshot", id: snap.id }, top.thin_id);
  const name = deviceName(cfg.prefix, cfg.pool, "snap", thinId);
  updateSnapshot(db, snap.id, { thin_id: thinId, device_name: name });
  const createStep = beginCreateStep(db, cfg.pool, work.id, { op: "create_snap", thinId, originId: top.thin_id! }).id;
  const openStep = beginStep(db, work.id, cfg.pool, "activate_device", { thinId, deviceName: name }).id;
  setDevice(db, { pool: cfg.pool, name, thinId, kind: "snap", state: "activating" });
  return { thinId, name, createStep, openStep };
}

/** The pool section of an activation: create the snapshot's thin id, load its device, grow it. Two
 * commits in all: the intents (the caller's, above) and the outcome. */
async function activateInPool(ctx: Ctx, top: LayerRow, snap: SnapshotRow, work: WorkRow, size: number, st: ActivationProgress): Promise<void> {
  const { db, cfg } = ctx;
  const poolName = cfg.pool;
  const topInfo = await activeDevice(top.device_name!);
  if (topInfo) {
    throw new ThinimgError("conflict", `layer device ${top.device_name} is active; refusing to snapshot it without a suspend`, {
      hint: "committed layers are never left active by thinimg; `bun scripts/gc.ts` shows why it is",
    });
  }
  // the host dm queue is held across both commands (one acquire, not two): the DB work between
  // them is a commit at most, and the grow below runs outside it
  await withHostQueue(`activate snapshot ${snap.id}`, () => createAndLoad(ctx, top, snap, work, size, st));
  const thinId = st.thinId!;
  const name = st.name!;
  if (size > top.virtual_size) await growExt4(dmsetup.mapperPath(name), { ctx: { pool_name: poolName, device_id: thinId, device_name: name } });
  tx(db, () => {
    endStep(db, st.createStep!, "done", "ok");
    setDeviceState(db, poolName, name, "active");
    endStep(db, st.openStep!, "done", "ok");
    [st.createStep, st.openStep] = [null, null];
    setThinIdState(db, poolName, thinId, "committed");
    updateSnapshot(db, snap.id, { state: "active", activated_at: Date.now() });
    finishWork(db, work.id, "done");
  });
}

/** The snapshot's create_snap (the next id when one is taken) and its device's load. */
async function createAndLoad(ctx: Ctx, top: LayerRow, snap: SnapshotRow, work: WorkRow, size: number, st: ActivationProgress): Promise<void> {
  const { db, cfg } = ctx;
  const poolName = cfg.pool;
  for (let tries = 0; ; tries++) {
    const intent = { id: st.createStep! };
    st.createStep = null; // poolCreate's until it returns
    try {
      await poolCreate(ctx, work.id, { op: "create_snap", thinId: st.thinId!, originId: top.thin_id! }, { txn: false, intent, deferDone: true });
      [st.created, st.createStep] = [true, intent.id];
      break;
    } catch (e) {
      if (!(e instanceof ThinIdTaken) || tries >= 15) throw e;
    }
    // the id was taken (recorded orphaned by poolCreate): the device's intent moves to the next one
    const next = tx(db, () => {
      endStep(db, st.openStep!, "failed", "error", `thin id ${st.thinId} was taken; not activated`);
      setDeviceState(db, poolName, st.name!, "removed", `never activated: thin id ${st.thinId} was taken`);
      return claimThinId(ctx, top, snap, work);
    });
    Object.assign(st, next);
  }
  await pausePoint("activate:created", cfg.stateDir);
  const thinId = st.thinId!;
  const name = st.name!;
  // its intent (the `activate_device` step naming the device) committed before the pool section
  await pool.activateThin(poolName, name, thinId, size, { ctx: { pool_name: poolName, device_id: thinId, device_name: name }, intentOnDisk: true });
  st.active = true;
}

/** Records a failed activation (leaks, the snapshot, thin id, device and work rows) and returns the error to throw. */
async function recordActivateFailure(ctx: Ctx, img: ImageRow, snap: SnapshotRow, work: WorkRow, st: ActivationProgress, e: unknown): Promise<ThinimgError> {
  const { db } = ctx;
  const poolName = ctx.cfg.pool;
  const { thinId, name, created, active, createStep, openStep } = st;
  const leaks: Leak[] = [];
  if (thinId !== null && created) leaks.push({ kind: "thin_id", ref: thinId, reason: `activation of snapshot ${snap.id} failed` });
  // a failed (e.g. timed-out) `dmsetup create` may still have left the device: gone only if verified
  const deviceRow = name !== null && getDevice(db, poolName, name) !== null;
  let deviceLeft = active;
  if (!active && deviceRow)
    deviceLeft = await activeDevice(name!).then(
      (d) => d !== null,
      () => true,
    );
  if (name && deviceLeft) leaks.push({ kind: "device", ref: name, reason: `activation of snapshot ${snap.id} failed` });
  const err = failure(`activate ${img.name}`, e, leaks);
  const c = classify(e);
  tx(db, () => {
    if (createStep !== null) endStep(db, createStep, created ? "done" : "failed", created ? "ok" : "not sent", created ? null : err.message);
    if (openStep !== null) endStep(db, openStep, "failed", "error", err.message);
    updateSnapshot(db, snap.id, { state: "failed", error: err.message });
    if (thinId !== null) {
      const t = getThinId(db, poolName, thinId);
      // allocated-but-unconfirmed ids may exist in the pool: orphaned, so GC looks at them
      if (t && (t.state === "allocated" || t.state === "created")) setThinIdState(db, poolName, thinId, "orphaned", `activation failed: ${err.message}`);
    }
    if (name && deviceRow)
      setDeviceState(db, poolName, name, deviceLeft ? "leaked" : "removed", deviceLeft ? err.message : `never activated (verified absent): ${err.message}`);
    finishWork(db, work.id, "failed", { error: err.message, kind: c.errorKind, leaks });
  });
  return err;
}

/** SNAPSHOT is a snapshot id, a device name, or /dev/mapper/<name>. */
export function findSnapshot(ctx: Ctx, ref: string): SnapshotRow {
  const r = ref.replace(/^\/dev\/mapper\//, "");
  let s: SnapshotRow | null = null;
  if (/^\d+$/.test(r)) s = getSnapshot(ctx.db, Number(r));
  else if (parseDeviceName(ctx.cfg.prefix, ctx.cfg.pool, r)?.kind === "snap") s = getSnapshotByDevice(ctx.db, ctx.cfg.pool, r);
  if (!s || s.pool !== ctx.cfg.pool) {
    throw new ThinimgError("input", `no snapshot ${quoted(ref)} in pool ${ctx.cfg.pool}`, {
      hint: "pass a snapshot id or device name from `bun scripts/list.ts`",
    });
  }
  return s;
}

export interface ReleaseResult {
  snapshot_id: number;
  device_name: string | null;
  /** already: it was released before (a repeat is a no-op). */
  state: "released" | "already_released";
  duration_ms: number;
}

export async function release(ctx: Ctx, ref: string, o: ActivateOptions = {}): Promise<ReleaseResult> {
  const t0 = performance.now();
  const { db, cfg } = ctx;
  const poolName = cfg.pool;
  const snap = findSnapshot(ctx, ref);
  if (snap.state === "released")
    return { snapshot_id: snap.id, device_name: snap.device_name, state: "already_released", duration_ms: Math.round(performance.now() - t0) };
  if (snap.state !== "active" || !snap.device_name || snap.thin_id === null) {
    throw new ThinimgError("conflict", `snapshot ${snap.id} is ${snap.state}${snap.error ? ` (${snap.error})` : ""}; there is nothing to release`, {
      hint: snap.state === "failed" ? "its leftovers are recorded; `bun scripts/gc.ts` removes them" : "wait for the activation to finish",
    });
  }
  const name = snap.device_name;
  const info = (await activeDevice(name)) ? await dmsetup.info(name) : null;
  if (info) {
    const mounts = mnt.mountsOf(`${info.major}:${info.minor}`);
    if (mounts.length > 0) {
      throw new ThinimgError("conflict", `snapshot ${snap.id} (${name}) is mounted at ${mounts.map((m) => m.mountPoint).join(", ")}`, {
        hint: "unmount it first, then release",
      });
    }
    if (info.open > 0) {
      throw new ThinimgError("conflict", `snapshot ${snap.id} (${name}) is open by ${info.open} user(s)`, {
        hint: "stop the microVM (or whatever holds it) first, then release",
      });
    }
  }
  if (!o.skipHealth) await (o.preflight ?? preflight)(ctx);
  const work = startWork(db, poolName, "release", workSubject("snapshot", snap.id), ctx.owner);
  let openStep: number | null = null;
  try {
    const step = beginStep(db, work.id, poolName, "remove_device", { thinId: snap.thin_id, deviceName: name });
    openStep = step.id;
    setDeviceState(db, poolName, name, "removing");
    if (info) await retryBusyOnce(`dmsetup remove ${name}`, () => dmsetup.remove(name, { ctx: { pool_name: poolName, device_id: snap.thin_id! } }));
    tx(db, () => {
      setDeviceState(db, poolName, name, "removed");
      endStep(db, step.id, "done", info ? "ok" : "was not active");
      setThinIdState(db, poolName, snap.thin_id!, "orphaned", `snapshot ${snap.id} released`);
      updateSnapshot(db, snap.id, { state: "released", released_at: Date.now() });
      finishWork(db, work.id, "done");
    });
  } catch (e) {
    const err = failure(`release snapshot ${snap.id}`, e, [{ kind: "device", ref: name, reason: "release failed" }]);
    tx(db, () => {
      if (openStep !== null) endStep(db, openStep, "failed", "error", err.message);
      // a timed-out remove may still land: the device is GC's now, never this run's to touch again
      setDeviceState(db, poolName, name, isTimeout(e) ? "leaked" : "active", `release failed: ${err.message}`);
      finishWork(db, work.id, "failed", { error: err.message, kind: classify(e).errorKind });
    });
    throw err;
  }
  return { snapshot_id: snap.id, device_name: name, state: "released", duration_ms: Math.round(performance.now() - t0) };
}
