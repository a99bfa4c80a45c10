// Build one layer device, as a resumable state machine. layers.phase is the last completed step;
// each step writes its intent (steps row) first and records the outcome with the phase change in one
// transaction. A later run resumes from the phase after checking the real device, mount and ledger:
//
//   new → allocated (thin id from the ledger)
//       → created   (create_thin, or create_snap of the INACTIVE parent device: no suspend needed)
//       → activated (dmsetup create <prefix>-<pool>-layer-<id>)
//       → formatted (mkfs.ext4, base layer only)
//       → mounted   (nosuid,nodev under <stateDir>/mnt)
//       → applied   (applyLayer) → unmounted (syncfs, umount) → deactivated (dmsetup remove)
//       → committed
//
// An apply that was interrupted cannot be trusted (half a layer): that attempt is abandoned — its
// thin id, device and mount are recorded as leaked for GC — and a fresh thin id is built instead.
import { mkdirSync } from "node:fs";
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { mkfsExt4 } from "../dm/mkfs.ts";
import * as mnt from "../dm/mount.ts";
import * as pool from "../dm/pool.ts";
import { ThinimgError } from "../errors.ts";
import { runOk } from "../exec.ts";
import { applyLayer } from "../image/apply/index.ts";
import type { LayerRef } from "../image/types.ts";
import { log } from "../log.ts";
import { tx } from "../store/db.ts";
import { getDevice, setDevice, setDeviceState } from "../store/devices.ts";
import { type LayerPhase, type LayerRow, getLayer, updateLayer } from "../store/layers.ts";
import { getMount, setMount, setMountState } from "../store/mounts.ts";
import { allocateThinId, getThinId, setThinIdState } from "../store/thin-ids.ts";
import { type Leak, beginStep, endStep, finishWork, startWork } from "../store/work.ts";
import type { Ctx } from "./context.ts";
import { classify, failure } from "./failure.ts";
import { deviceName, mountPathFor } from "./names.ts";
import { pausePoint } from "./pause.ts";
import { withRetry } from "./retry.ts";
import { ThinIdTaken, activeDevice, inPoolSection, poolCreate, poolMajorMinor } from "./txn.ts";

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
  if (l.thin_id !== null && at >= order.indexOf("created")) leaks.push({ kind: "thin_id", ref: l.thin_id, reason: `layer ${l.chain_id} build failed at ${l.phase}` });
  if (l.device_name && at >= order.indexOf("activated") && at < order.indexOf("deactivated")) leaks.push({ kind: "device", ref: l.device_name, reason: "layer build failed" });
  if (mountPath && at >= order.indexOf("mounted") && at < order.indexOf("unmounted")) leaks.push({ kind: "mount", ref: mountPath, reason: "layer build failed" });
  return leaks;
}

export async function buildLayer(ctx: Ctx, input: BuildInput): Promise<BuildResult> {
  const { db, cfg } = ctx;
  const poolName = cfg.pool;
  let l = getLayer(db, input.layerId)!;
  if (l.state === "committed") return { layer: l, abandoned: 0, built: false };
  const work = startWork(db, poolName, "build_layer", `layer:${l.id}`, ctx.owner);
  let abandoned = 0;
  let entering = true;
  let mountPath = l.device_name ? mountPathFor(cfg.mountDir, l.device_name) : null;
  const reload = () => {
    l = getLayer(db, input.layerId)!;
    mountPath = l.device_name ? mountPathFor(cfg.mountDir, l.device_name) : null;
  };
  const setPhase = (phase: LayerPhase, extra: Parameters<typeof updateLayer>[2] = {}) => {
    updateLayer(db, l.id, { phase, ...extra });
    reload();
  };
  const pause = (step: string) => pausePoint(step, cfg.stateDir);

  /** Give up on the current thin id: everything it holds is left in place and recorded for GC. */
  const abandon = (why: string) => {
    tx(db, () => {
      if (l.thin_id !== null) {
        const t = getThinId(db, poolName, l.thin_id);
        if (t && t.state !== "deleted" && t.state !== "deleting") setThinIdState(db, poolName, l.thin_id, "orphaned", `abandoned build attempt of layer ${l.id}: ${why}`);
      }
      if (l.device_name) {
        const d = getDevice(db, poolName, l.device_name);
        if (d && (d.state === "active" || d.state === "activating" || d.state === "removing")) setDeviceState(db, poolName, d.name, "leaked", `abandoned build attempt: ${why}`);
      }
      if (mountPath) {
        const m = getMount(db, mountPath);
        if (m && m.state !== "unmounted") setMountState(db, mountPath, "leaked", `abandoned build attempt: ${why}`);
      }
      updateLayer(db, l.id, { thin_id: null, device_name: null, phase: "new", state: "building", error: null, error_kind: null });
    });
    log.warn(`layer ${input.label}: abandoning thin id ${l.thin_id} (${why}); its leftovers are recorded for \`bun scripts/gc.ts\``);
    abandoned++;
    reload();
  };

  try {
    updateLayer(db, l.id, { state: "building" });
    reload();
    while (l.phase !== "committed") {
      // On (re-)entry, check what the recorded phase claims against the ledger.
      if (entering) {
        entering = false;
        if (l.thin_id !== null) {
          const t = getThinId(db, poolName, l.thin_id);
          if (!t || !LIVE_THIN.has(t.state)) abandon(`its thin id is ${t?.state ?? "missing from the ledger"}`);
          else if (l.phase === "allocated" && t.state === "created") setPhase("created");
          else if (l.phase === "mounted") abandon("a previous apply was interrupted; a half-applied layer is never reused");
        } else if (l.phase !== "new") setPhase("new");
      }
      const dev = l.device_name;
      switch (l.phase) {
        case "new": {
          const id = allocateThinId(db, poolName, { kind: "layer", id: l.id }, input.parent?.thin_id ?? null);
          const name = deviceName(cfg.prefix, poolName, "layer", id);
          setPhase("allocated", { thin_id: id, device_name: name, attempt: l.attempt + 1 });
          await pause("layer:allocated");
          break;
        }
        case "allocated": {
          const thinId = l.thin_id!;
          let settled: "created" | "gone" | null = null;
          try {
            await inPoolSection(ctx, async () => {
              // the section began by settling dead processes' intents: this id may have just been
              // proven created (resume) or found in the pool unproven (orphaned: never adopted)
              const t = getThinId(db, poolName, thinId);
              if (t?.state === "created") {
                settled = "created";
                return;
              }
              if (t?.state !== "allocated") {
                settled = "gone";
                return;
              }
              if (input.parent) {
                // create_snap of an ACTIVE origin would need a suspend; we only snapshot inactive ones
                const pinfo = await activeDevice(input.parent.device_name!);
                if (pinfo) {
                  throw new ThinimgError("conflict", `parent layer device ${input.parent.device_name} is active; refusing to snapshot it without a suspend`, {
                    hint: "it is not in use by thinimg; check who holds it, then `bun scripts/gc.ts`",
                  });
                }
                await poolCreate(ctx, work.id, { op: "create_snap", thinId, originId: input.parent.thin_id! });
              } else {
                await poolCreate(ctx, work.id, { op: "create_thin", thinId });
              }
            });
          } catch (e) {
            if (e instanceof ThinIdTaken) {
              if (l.attempt >= MAX_ID_TRIES) throw new ThinimgError("conflict", `pool ${poolName}: ${MAX_ID_TRIES} thin ids in a row already existed`, { hint: "the pool has devices thinimg did not record; run `bun scripts/gc.ts`" });
              setPhase("new", { thin_id: null, device_name: null });
              break;
            }
            throw e;
          }
          if (settled === "gone") {
            abandon("an interrupted create of it could not be proven");
            break;
          }
          setPhase("created");
          await pause("layer:created");
          break;
        }
        case "created": {
          const step = beginStep(db, work.id, poolName, "activate_device", { thinId: l.thin_id, deviceName: dev });
          setDevice(db, { pool: poolName, name: dev!, thinId: l.thin_id!, kind: "layer", state: "activating" });
          await ensureActive(poolName, dev!, l.thin_id!, l.virtual_size);
          tx(db, () => {
            setDeviceState(db, poolName, dev!, "active");
            endStep(db, step.id, "done", "ok");
          });
          setPhase("activated");
          await pause("layer:activated");
          break;
        }
        case "activated": {
          if (!input.parent) {
            const step = beginStep(db, work.id, poolName, "mkfs", { thinId: l.thin_id, deviceName: dev });
            ctx.progress?.stage(`layer ${input.label}: mkfs`);
            await mkfsExt4(dmsetup.mapperPath(dev!), { ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } });
            endStep(db, step.id, "done", "ok");
          }
          setPhase("formatted");
          await pause("layer:formatted");
          break;
        }
        case "formatted": {
          const path = mountPathFor(cfg.mountDir, dev!);
          mkdirSync(path, { recursive: true, mode: 0o700 });
          const step = beginStep(db, work.id, poolName, "mount", { thinId: l.thin_id, deviceName: dev });
          setMount(db, { path, pool: poolName, deviceName: dev!, thinId: l.thin_id!, purpose: "apply", state: "mounting" });
          const info = await activeDevice(dev!);
          const mm = info ? `${info.major}:${info.minor}` : null;
          const already = mnt.mountinfo().filter((m) => m.mountPoint === path);
          if (already.length > 0) {
            if (!mm || !already.every((m) => m.majorMinor === mm)) {
              throw new ThinimgError("conflict", `${path} is already mounted by something else`, { hint: "check `findmnt`; then `bun scripts/gc.ts`" });
            }
          } else {
            await mnt.mount(dmsetup.mapperPath(dev!), path, { fstype: "ext4", options: APPLY_MOUNT_OPTIONS, ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } });
          }
          tx(db, () => {
            setMountState(db, path, "mounted");
            endStep(db, step.id, "done", "ok");
          });
          setPhase("mounted");
          await pause("layer:mounted");
          break;
        }
        case "mounted": {
          const path = mountPath!;
          const step = beginStep(db, work.id, poolName, "apply", { thinId: l.thin_id, deviceName: dev });
          ctx.progress?.stage(`layer ${input.label}: apply`);
          const stream = await input.ref.open();
          const stats = await applyLayer(stream, path, {
            devices: true,
            sameOwner: true,
            layerLabel: input.label,
            limits: { maxEntries: cfg.limits.maxEntries, maxTotalBytes: cfg.limits.maxLayerBytes, maxFileBytes: cfg.limits.maxFileBytes },
            onProgress: (b) => ctx.progress?.bytes(b, null),
          });
          tx(db, () => {
            endStep(db, step.id, "done", `entries=${stats.entries} bytes=${stats.bytes} whiteouts=${stats.whiteouts}`);
            updateLayer(db, l.id, { stats: JSON.stringify(stats) });
          });
          setPhase("applied");
          await pause("layer:applied");
          break;
        }
        case "applied": {
          const path = mountPath!;
          const step = beginStep(db, work.id, poolName, "umount", { thinId: l.thin_id, deviceName: dev });
          const mounted = mnt.mountinfo().some((m) => m.mountPoint === path);
          if (mounted) {
            // syncfs first: a write error (I/O error, pool out of space) surfaces here, not silently
            await runOk(["sync", "-f", path], { timeoutMs: 300_000, ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } });
            setMountState(db, path, "unmounting");
            await withRetry(`umount ${path}`, () => mnt.umount(path, { ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } }), cfg.retry);
          }
          tx(db, () => {
            setMountState(db, path, "unmounted");
            endStep(db, step.id, "done", mounted ? "ok" : "was not mounted");
          });
          setPhase("unmounted");
          await pause("layer:unmounted");
          break;
        }
        case "unmounted": {
          const step = beginStep(db, work.id, poolName, "remove_device", { thinId: l.thin_id, deviceName: dev });
          setDeviceState(db, poolName, dev!, "removing");
          const info = await activeDevice(dev!);
          if (info) await withRetry(`dmsetup remove ${dev}`, () => dmsetup.remove(dev!, { ctx: { pool_name: poolName, device_id: l.thin_id! } }), cfg.retry);
          tx(db, () => {
            setDeviceState(db, poolName, dev!, "removed");
            endStep(db, step.id, "done", info ? "ok" : "was not active");
          });
          setPhase("deactivated");
          await pause("layer:deactivated");
          break;
        }
        case "deactivated": {
          tx(db, () => {
            setThinIdState(db, poolName, l.thin_id!, "committed");
            updateLayer(db, l.id, { phase: "committed", state: "committed", committed_at: Date.now(), error: null, error_kind: null });
            finishWork(db, work.id, "done");
          });
          reload();
          break;
        }
        default:
          throw new ThinimgError("internal", `layer ${l.id}: unknown phase ${l.phase}`);
      }
    }
    return { layer: l, abandoned, built: true };
  } catch (e) {
    const leaks = heldResources(l, mountPath);
    let c = classify(e);
    let override: { message: string } | undefined;
    if (c.errorKind !== "policy" && c.errorKind !== "input" && (await poolOutOfSpace(ctx))) {
      c = { kind: "dm", errorKind: "no_space" };
      override = { message: `pool ${poolName} ran out of data space (${(e as Error).message})` };
    }
    const err = failure(`layer ${input.label}`, e, leaks, override);
    tx(db, () => {
      updateLayer(db, l.id, { state: "failed", error: err.message, error_kind: c.errorKind });
      if (l.device_name && leaks.some((x) => x.kind === "device")) setDeviceState(db, poolName, l.device_name, "leaked", err.message);
      if (mountPath && leaks.some((x) => x.kind === "mount")) setMountState(db, mountPath, "leaked", err.message);
      finishWork(db, work.id, "failed", { error: err.message, kind: c.errorKind, leaks });
    });
    throw err;
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
  const table = await dmsetup.table(name);
  const mm = await poolMajorMinor(poolName);
  const m = /^0 (\d+) thin (\S+) (\d+)/.exec(table);
  if (!m || m[2] !== mm || Number(m[3]) !== thinId) {
    throw new ThinimgError("conflict", `device ${name} exists with another table (${table})`, { hint: "it is not ours to touch; run `bun scripts/gc.ts` to review" });
  }
}

async function poolOutOfSpace(ctx: Ctx): Promise<boolean> {
  try {
    const st = await pool.poolStatus(ctx.cfg.pool);
    return st.kind === "ok" && (st.mode === "out_of_data_space" || st.dataUsed >= st.dataTotal);
  } catch {
    return false;
  }
}

