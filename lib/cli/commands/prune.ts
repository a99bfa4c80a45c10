// bun scripts/prune.ts [--unused-for 7d] [--keep-last N] [--dry-run] [--json] — remove the images no
// snapshot uses that were not used for a while (last activation, or unpack), keeping the newest N of
// each name group; prints what goes and the pool space `bun scripts/gc.ts --force` then frees.
import { defineCommand } from "citty";
import { usageError } from "../../errors.ts";
import { assertPruneRule, prune } from "../../pipeline/prune.ts";
import { formatBytes, parseDuration } from "../../util/units.ts";
import { dryRunArgs } from "../args.ts";
import { printJson } from "../main.ts";
import { ctxFrom, pipelineArgs } from "../pipeline.ts";

export const pruneCommand = defineCommand({
  meta: { name: "prune", description: "Remove images no snapshot uses and nobody activated for a while; `bun scripts/gc.ts --force` then frees their space" },
  args: {
    "unused-for": { type: "string", description: "Only images unused (not activated, or never activated: not unpacked) for this long, e.g. 7d, 12h" },
    "keep-last": { type: "string", description: "Keep the newest N images of each name group (name without its :tag or -<version>)" },
    space: { type: "boolean", description: "Estimate the space GC frees from the pool's metadata (--no-space: skip)", default: true },
    ...dryRunArgs,
    ...pipelineArgs,
  },
  async run({ args }) {
    const keep = args["keep-last"];
    if (keep !== undefined && !/^\d+$/.test(keep)) throw usageError(`--keep-last: "${keep}" is not a whole number`, "e.g. --keep-last 2");
    const rule = {
      unusedForMs: args["unused-for"] === undefined ? null : parseDuration(args["unused-for"], "--unused-for", { unit: "required" }),
      keepLast: keep === undefined ? null : Number(keep),
    };
    assertPruneRule(rule);
    const ctx = ctxFrom(args, { existing: true });
    try {
      const r = await prune(ctx, {
        ...rule,
        dryRun: args["dry-run"],
        space: args.space,
      });
      ctx.progress?.done(); // a "waiting for image" line must not run into the output
      if (args.json) {
        printJson({ ok: true, ...r }, "prune");
        return;
      }
      const verb = r.dry_run ? "would remove" : "removed";
      for (const p of r.prune) process.stdout.write(`${verb} ${p.name}  (last used ${p.last_used_at})\n`);
      for (const x of r.removed.filter((x) => x.state === "skipped")) process.stdout.write(`kept ${x.name}: ${x.skip_reason}\n`);
      const space = r.freed_bytes === null ? `unknown (${r.space_detail})` : formatBytes(r.freed_bytes);
      const done = r.dry_run ? "would be removed" : "removed";
      process.stdout.write(`${r.prune.length} image(s) ${done}, ${r.kept.length} kept; then \`bun scripts/gc.ts --force\` frees ${space} of pool space\n`);
    } finally {
      ctx.progress?.done();
      ctx.db.close();
    }
  },
});

export default pruneCommand;
