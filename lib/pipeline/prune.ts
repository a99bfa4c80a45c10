// Prune: remove the images nobody runs. An image is a candidate when no snapshot of it is active (or
// being activated) and, with --unused-for, it was last used at least that long ago — last used being
// its last activation, or, never activated, when it was unpacked (ready_at). With --keep-last N the
// newest N images (by unpack time) of each name group are kept whatever their age. Name groups: the
// name without its last `:tag` (`web:42` → `web`), else without a last `-<version>` where the version
// starts with a digit or `v<digit>` (`web-2026.12.01`, `web-v3` → `web`), else the whole name.
// The selection is pure (a clock passed in); the removal is remove's, each image re-checked under its
// lock; the space figure is what `gc --force` then frees (lib/pipeline/space.ts).
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import type { Ctx } from "../pool/context.ts";
import { readGcRows } from "../store/gc-queries.ts";
import { type ImageUse, imageUses } from "../store/lifecycle.ts";
import { type RemovedImage, removeImageRows } from "./remove.ts";
import { estimateFreed, readBlockMap, type SpaceEstimate } from "./space.ts";

export interface PruneOptions {
  /** Only images unused for at least this long (ms); null: any age. */
  unusedForMs: number | null;
  /** Keep the newest N of each name group; null: no such rule. */
  keepLast: number | null;
  dryRun: boolean;
  /** The clock (ms): injectable for tests. */
  now?: () => number;
  /** Estimate the space GC frees from the pool's metadata (default true). */
  space?: boolean;
}

export type KeepReason = "in_use" | "recently_used" | "newest_of_group" | "not_ready";

export interface PruneEntry {
  id: number;
  name: string;
  group: string;
  last_used_at: string;
  /** Set on kept images. */
  keep_reason: KeepReason | null;
}

export interface PruneResult {
  dry_run: boolean;
  now: string;
  unused_for_ms: number | null;
  keep_last: number | null;
  /** Removed (or, dry-run, would be). */
  prune: PruneEntry[];
  kept: PruneEntry[];
  /** Pool space `gc --force` frees after this prune (blocks no kept thin id shares). */
  freed_bytes: number | null;
  freed_blocks: number | null;
  space_detail: string | null;
  /** What remove did per image (empty on a dry-run). */
  removed: RemovedImage[];
  duration_ms: number;
}

/** The name group --keep-last counts in (see the header). */
export function pruneGroup(name: string): string {
  const colon = name.lastIndexOf(":");
  if (colon > 0) return name.slice(0, colon);
  const m = /^(.+?)-v?\d[^-]*$/.exec(name);
  return m ? m[1]! : name;
}

const lastUsed = (u: ImageUse) => u.lastActivatedAt ?? u.image.ready_at ?? u.image.updated_at;

/** Which images go, which stay and why. Pure. */
export function selectPrune(uses: ImageUse[], o: Pick<PruneOptions, "unusedForMs" | "keepLast">, now: number): { prune: PruneEntry[]; kept: PruneEntry[] } {
  const newest = new Set<number>();
  if (o.keepLast !== null) {
    const groups = new Map<string, ImageUse[]>();
    for (const u of uses) groups.set(pruneGroup(u.image.name), [...(groups.get(pruneGroup(u.image.name)) ?? []), u]);
    for (const g of groups.values()) {
      g.sort((a, b) => (b.image.ready_at ?? b.image.created_at) - (a.image.ready_at ?? a.image.created_at) || b.image.id - a.image.id);
      for (const u of g.slice(0, o.keepLast)) newest.add(u.image.id);
    }
  }
  const prune: PruneEntry[] = [];
  const kept: PruneEntry[] = [];
  for (const u of uses) {
    const entry = (keep: KeepReason | null): PruneEntry => ({
      id: u.image.id,
      name: u.image.name,
      group: pruneGroup(u.image.name),
      last_used_at: new Date(lastUsed(u)).toISOString(),
      keep_reason: keep,
    });
    let keep: KeepReason | null = null;
    if (u.image.state === "unpacking") keep = "not_ready";
    else if (u.activeSnapshots > 0) keep = "in_use";
    else if (o.unusedForMs !== null && now - lastUsed(u) < o.unusedForMs) keep = "recently_used";
    else if (newest.has(u.image.id)) keep = "newest_of_group";
    (keep ? kept : prune).push(entry(keep));
  }
  return { prune, kept };
}

async function estimate(ctx: Ctx, ids: Set<number>, now: number): Promise<SpaceEstimate> {
  if (ids.size === 0) return { bytes: 0, blocks: 0, detail: null };
  try {
    const map = await readBlockMap(ctx.cfg.pool, ctx.cfg.stateDir);
    return estimateFreed(ctx.cfg.pool, readGcRows(ctx.db, ctx.cfg.pool), map, ids, now);
  } catch (e) {
    const detail = e instanceof ThinimgError ? e.oneLine() : e instanceof Error ? e.message : String(e);
    log.warn(`prune: cannot estimate the space GC will free: ${detail}`);
    return { bytes: null, blocks: null, detail };
  }
}

/** A prune needs a rule; the command checks this before it opens the state dir, prune() again. */
export function assertPruneRule(o: Pick<PruneOptions, "unusedForMs" | "keepLast">): void {
  if (o.unusedForMs === null && o.keepLast === null) {
    throw new ThinimgError("usage", "prune needs --unused-for and/or --keep-last", {
      hint: "e.g. bun scripts/prune.ts --unused-for 7d --keep-last 2 --dry-run",
    });
  }
  if (o.keepLast !== null && (!Number.isSafeInteger(o.keepLast) || o.keepLast < 0))
    throw new ThinimgError("usage", `--keep-last must be a whole number ≥ 0, not ${o.keepLast}`);
}

export async function prune(ctx: Ctx, o: PruneOptions): Promise<PruneResult> {
  const t0 = performance.now();
  assertPruneRule(o);
  const clock = o.now ?? Date.now;
  const now = clock();
  const sel = selectPrune(imageUses(ctx.db, ctx.cfg.pool), o, now);
  const space =
    o.space === false ? { bytes: null, blocks: null, detail: "not computed (--no-space)" } : await estimate(ctx, new Set(sel.prune.map((p) => p.id)), now);
  let removed: RemovedImage[] = [];
  if (!o.dryRun && sel.prune.length) {
    // each image is checked again under its lock: activated or unpacked anew since the selection → kept
    const guard = (img: { id: number }): string | null => {
      const u = imageUses(ctx.db, ctx.cfg.pool).find((x) => x.image.id === img.id);
      if (!u) return "no longer there";
      const again = selectPrune([u], { unusedForMs: o.unusedForMs, keepLast: null }, clock()).kept[0];
      return again ? `kept: ${again.keep_reason} (changed since the selection)` : null;
    };
    const rows = imageUses(ctx.db, ctx.cfg.pool)
      .filter((u) => sel.prune.some((p) => p.id === u.image.id))
      .map((u) => u.image);
    removed = (await removeImageRows(ctx, rows, { guard })).images;
  }
  return {
    dry_run: o.dryRun,
    now: new Date(now).toISOString(),
    unused_for_ms: o.unusedForMs,
    keep_last: o.keepLast,
    prune: sel.prune,
    kept: sel.kept,
    freed_bytes: space.bytes,
    freed_blocks: space.blocks,
    space_detail: space.detail,
    removed,
    duration_ms: Math.round(performance.now() - t0),
  };
}
