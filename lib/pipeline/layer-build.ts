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
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError, runTool } from "../dm/errors.ts";
import { mkfsExt4 } from "../dm/mkfs.ts";
import * as mnt from "../dm/mount.ts";
import * as pool from "../dm/pool.ts";
import { ThinimgError } from "../errors.ts";
import { applyLayer } from "../image/apply/index.ts";
import type { LayerRef } from "../image/types.ts";
import { log } from "../log.ts";
import { tx } from "../store/db.ts";
import { setDevice, setDeviceState } from "../store/devices.ts";
import { type LayerPhase, type LayerRow, abandonLayerAttempt, getLayer, updateLayer } from "../store/layers.ts";
import { setMount, setMountState } from "../store/mounts.ts";
import { allocateThinId, getThinId, setThinIdState } from "../store/thin-ids.ts";
import { type Leak, beginStep, endStep, finishWork, startWork, stepDone, stepsOf } from "../store/work.ts";
import type { Ctx } from "./context.ts";
import { classify, failure } from "./failure.ts";
import { deviceName, mountPathFor } from "./names.ts";
import { pausePoint } from "./pause.ts";
import { retryBusyOnce } from "./retry.ts";
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
  // The step whose intent is written but whose outcome is not: ended `failed` on an error (a record,
  // not a cleanup), so it never looks like the work of a dead process.
  const open: { step: { id: number; name: string } | null } = { step: null };
  const begin = (name: string) => {
    const st = beginStep(db, work.id, poolName, name, { thinId: l.thin_id, deviceName: l.device_name });
    open.step = { id: st.id, name };
  };
  const end = (outcome: string) => {
    if (open.step) endStep(db, open.step.id, "done", outcome);
    open.step = null;
  };
  /** Phase to return to after a re-activation (a reboot dropped the device; its data is intact). */
  let resumeAt: LayerPhase | null = null;
  const mounted = (path: string | null) => path !== null && mnt.mountinfo().some((m) => m.mountPoint === path);

  /** Give up on the current thin id: everything it holds is left in place and recorded for GC. */
  const abandon = (why: string) => {
    tx(db, () => abandonLayerAttempt(db, poolName, l, why, mountPath));
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
          else if (l.phase === "activated" || l.phase === "formatted") {
            // after a reboot the device is gone (its thin id and data are not): load it again
            if (!(await activeDevice(l.device_name!))) {
              log.info(`layer ${input.label}: device ${l.device_name} is not active (host restarted?); re-activating thin id ${l.thin_id}`);
              resumeAt = l.phase;
              setPhase("created");
            }
          } else if (l.phase === "applied") {
            // `applied` is written only after `sync -f` succeeded; a row without that proof (an older
            // thinimg, or a failed flush) is never committed: a fresh syncfs would not report the
            // earlier write error. Without mount AND device the host restarted before the unmount:
            // the filesystem was never cleanly unmounted (its journal not replayed), so not adopted.
            if (!stepDone(db, work.pool, "sync", l.thin_id)) abandon("its writes were never proven flushed (no successful `sync -f`)");
            else if (!mounted(mountPath) && !(await activeDevice(l.device_name!))) abandon("the host restarted before it was unmounted; an uncleanly unmounted layer is never reused");
          }
        } else if (l.phase !== "new") setPhase("new");
      }
      const dev = l.device_name;
      switch (l.phase) {
        case "new": {
          // the id and the layer's claim on it in one transaction: a crash between them leaks nothing
          tx(db, () => {
            const id = allocateThinId(db, poolName, { kind: "layer", id: l.id }, input.parent?.thin_id ?? null);
            updateLayer(db, l.id, { phase: "allocated", thin_id: id, device_name: deviceName(cfg.prefix, poolName, "layer", id), attempt: l.attempt + 1 });
          });
          reload();
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
          begin("activate_device");
          setDevice(db, { pool: poolName, name: dev!, thinId: l.thin_id!, kind: "layer", state: "activating" });
          await ensureActive(poolName, dev!, l.thin_id!, l.virtual_size);
          tx(db, () => {
            setDeviceState(db, poolName, dev!, "active");
            end(resumeAt ? `ok (re-activated; resuming at ${resumeAt})` : "ok");
          });
          const next = resumeAt ?? "activated";
          resumeAt = null;
          setPhase(next);
          if (next === "activated") await pause("layer:activated");
          break;
        }
        case "activated": {
          if (!input.parent) {
            begin("mkfs");
            ctx.progress?.stage(`layer ${input.label}: mkfs`);
            await mkfsExt4(dmsetup.mapperPath(dev!), { ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } });
            end("ok");
          }
          setPhase("formatted");
          await pause("layer:formatted");
          break;
        }
        case "formatted": {
          const path = mountPathFor(cfg.mountDir, dev!);
          mkdirSync(path, { recursive: true, mode: 0o700 });
          begin("mount");
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
            end("ok");
          });
          setPhase("mounted");
          await pause("layer:mounted");
          break;
        }
        case "mounted": {
          const path = mountPath!;
          begin("apply");
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
            end(`entries=${stats.entries} bytes=${stats.bytes} whiteouts=${stats.whiteouts}`);
            updateLayer(db, l.id, { stats: JSON.stringify(stats) });
          });
          await pause("layer:written"); // fault tests: applied to the page cache, not yet flushed
          // syncfs before `applied`: a write error (I/O error, pool out of space) surfaces here and
          // the attempt fails in `mounted` (never resumed). umount does not report such errors, and
          // a later syncfs only reports errors newer than its open (Linux >= 5.8), so this is the one
          // chance to know the layer is on disk. The `sync` step row is the proof a resume checks.
          begin("sync");
          await runTool(["sync", "-f", path], { timeoutMs: 300_000, ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } });
          tx(db, () => {
            end("ok");
            updateLayer(db, l.id, { phase: "applied" });
          });
          reload();
          await pause("layer:applied");
          break;
        }
        case "applied": {
          const path = mountPath!;
          begin("umount");
          const isMounted = mounted(path);
          if (isMounted) {
            // the data was flushed (and the flush checked) before `applied`
            setMountState(db, path, "unmounting");
            await retryBusyOnce(`umount ${path}`, () => mnt.umount(path, { ctx: { pool_name: poolName, device_id: l.thin_id!, device_name: dev! } }));
          }
          tx(db, () => {
            setMountState(db, path, "unmounted");
            end(isMounted ? "ok" : "was not mounted");
          });
          setPhase("unmounted");
          await pause("layer:unmounted");
          break;
        }
        case "unmounted": {
          begin("remove_device");
          setDeviceState(db, poolName, dev!, "removing");
          const info = await activeDevice(dev!);
          if (info) await retryBusyOnce(`dmsetup remove ${dev}`, () => dmsetup.remove(dev!, { ctx: { pool_name: poolName, device_id: l.thin_id! } }));
          tx(db, () => {
            setDeviceState(db, poolName, dev!, "removed");
            end(info ? "ok" : "was not active");
          });
          setPhase("deactivated");
          await pause("layer:deactivated");
          break;
        }
        case "deactivated": {
          tx(db, () => {
            // GC may have started deleting this id (a failed layer's id looks unused to it): commit
            // only while the ledger still says `created`, in the same transaction as the commit
            const t = getThinId(db, poolName, l.thin_id!);
            if (t?.state !== "created") {
              throw new ThinimgError("conflict", `its thin id ${l.thin_id} is ${t?.state ?? "missing from the ledger"} (GC claimed it?); the layer is not committed`, {
                hint: "re-run the unpack: it builds the layer on a fresh thin id",
              });
            }
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
    // a create whose outcome is unknown (timeout) stays pending for the next run to settle; until
    // then its id may exist in the pool
    if (l.thin_id !== null && !leaks.some((x) => x.kind === "thin_id") && stepsOf(db, work.id).some((s) => s.state === "pending" && s.thin_id === l.thin_id && s.name.startsWith("create_"))) {
      leaks.push({ kind: "thin_id", ref: l.thin_id, reason: `layer ${l.chain_id}: outcome of its create is unknown (settled by the next run)` });
    }
    let c = classify(e);
    let override: { message: string } | undefined;
    if (c.errorKind !== "policy" && c.errorKind !== "input" && (await poolOutOfSpace(ctx))) {
      c = { kind: "dm", errorKind: "no_space" };
      override = { message: `pool ${poolName} ran out of data space (${(e as Error).message})` };
    }
    const err = failure(`layer ${input.label}`, e, leaks, override);
    tx(db, () => {
      if (open.step) endStep(db, open.step.id, "failed", "error", err.message);
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

