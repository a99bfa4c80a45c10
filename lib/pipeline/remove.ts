// Remove images: a DB-only operation (no dm work, so no health check and no process lock). Under the
// image's named lock — an unpack or refresh of it in progress is waited for (bounded by --wait), then
// refused — one transaction marks the image removed and releases the layers no other image uses.
// Their thin ids are deleted by GC (`gc --force`: dry-run, grace, claims, 10 s bounds, as for every
// orphan); shared layers, and the parents of kept layers, stay. Active snapshots of the image are
// untouched: a dm-thin snapshot does not need its origin; they stay listed until released.
import { quoted, ThinimgError } from "../errors.ts";
import { acquireNamedLock } from "../lock/named-lock.ts";
import type { Ctx } from "../pool/context.ts";
import { assertImageName } from "../pool/names.ts";
import { getImage, getImageByName, type ImageRow } from "../store/images.ts";
import { imageLockKey } from "../store/keys.ts";
import { getLayer } from "../store/layers.ts";
import { removeImageRecord } from "../store/lifecycle.ts";
import { listSnapshots } from "../store/snapshots.ts";

export interface RemovedImage {
  id: number;
  name: string;
  /** already_removed: a repeat is a no-op; skipped: the guard (prune) said no under the lock. */
  state: "removed" | "already_removed" | "skipped";
  skip_reason: string | null;
  /** Layers no image uses now: `gc --force` deletes their thin ids (after the grace period). */
  released_layers: { id: number; chain_id: string; thin_id: number | null }[];
  /** Layers other images still use: kept. */
  shared_layers: number;
  /** Snapshots of the image that stay active (and listed) until released. */
  active_snapshots: number;
}

export interface RemoveResult {
  images: RemovedImage[];
  duration_ms: number;
}

export interface RemoveOptions {
  /** Checked under the image's lock, before anything changes: a reason not to remove it (prune). */
  guard?: (img: ImageRow) => string | null;
}

/** IMAGE is a name or an image id. Unknown names fail before anything is removed. */
function resolve(ctx: Ctx, ref: string): ImageRow {
  const img = /^\d+$/.test(ref)
    ? (getImageByName(ctx.db, ctx.cfg.pool, ref) ?? getImage(ctx.db, Number(ref)))
    : getImageByName(ctx.db, ctx.cfg.pool, assertImageName(ref));
  if (!img || img.pool !== ctx.cfg.pool) {
    throw new ThinimgError("input", `no image ${quoted(ref)} in pool ${ctx.cfg.pool}`, {
      hint: "see `bun scripts/list.ts` for the images of this pool",
    });
  }
  return img;
}

async function removeOne(ctx: Ctx, img: ImageRow, o: RemoveOptions): Promise<RemovedImage> {
  const { db, cfg } = ctx;
  const lock = await acquireNamedLock(db, imageLockKey(cfg.pool, img.name), {
    waitMs: cfg.lockWaitMs,
    command: ctx.owner.command,
    what: `image ${img.name}`,
    onWait: () => ctx.progress?.stage(`waiting for image ${img.name}`),
  });
  try {
    const fresh = getImage(db, img.id)!;
    const veto = fresh.removed_at ? null : (o.guard?.(fresh) ?? null);
    if (veto !== null) return { id: img.id, name: img.name, state: "skipped", skip_reason: veto, released_layers: [], shared_layers: 0, active_snapshots: 0 };
    const rec = removeImageRecord(db, img.id, `removed by ${ctx.owner.command} (pid ${ctx.owner.pid}) at ${new Date().toISOString()}`);
    const active = listSnapshots(db, cfg.pool, ["active", "pending"]).filter((s) => s.image_id === img.id).length;
    return {
      id: img.id,
      name: img.name,
      state: rec.already ? "already_removed" : "removed",
      skip_reason: null,
      released_layers: rec.released.map((id) => {
        const l = getLayer(db, id)!;
        return { id, chain_id: l.chain_id, thin_id: l.thin_id };
      }),
      shared_layers: rec.shared.length,
      active_snapshots: active,
    };
  } finally {
    lock.release();
  }
}

/** A removal names at least one image; the command checks this before it opens the state dir. */
export function assertImagesGiven(refs: string[]): void {
  if (refs.length === 0) throw new ThinimgError("usage", "no image given", { hint: "bun scripts/remove.ts IMAGE… (names from `bun scripts/list.ts`)" });
}

/** Remove images by name (or id). Idempotent; what it cannot do is left as it was. */
export async function removeImages(ctx: Ctx, refs: string[], o: RemoveOptions = {}): Promise<RemoveResult> {
  const t0 = performance.now();
  assertImagesGiven(refs);
  return removeImageRows(
    ctx,
    refs.map((r) => resolve(ctx, r)),
    o,
    t0,
  );
}

/** Remove these image rows (prune's selection), each under its lock. */
export async function removeImageRows(ctx: Ctx, images: ImageRow[], o: RemoveOptions = {}, t0 = performance.now()): Promise<RemoveResult> {
  const out: RemovedImage[] = [];
  const seen = new Set<number>();
  for (const img of images) {
    if (seen.has(img.id)) continue;
    seen.add(img.id);
    out.push(await removeOne(ctx, img, o));
  }
  return { images: out, duration_ms: Math.round(performance.now() - t0) };
}
