// bun scripts/remove.ts IMAGE… — remove images: gone from `list`; the layers no other image uses are
// released and `bun scripts/gc.ts --force` deletes their thin ids. Active snapshots keep working.
import { defineCommand } from "citty";
import { assertImagesGiven, removeImages } from "../../pipeline/remove.ts";
import { printJson } from "../main.ts";
import { ctxFrom, pipelineArgs } from "../pipeline.ts";

export const removeCommand = defineCommand({
  meta: { name: "remove", description: "Remove images (names or ids); `bun scripts/gc.ts --force` then frees the layers only they used" },
  args: {
    images: { type: "positional", required: false, description: "Image names or ids (from `bun scripts/list.ts`)" },
    ...pipelineArgs,
  },
  async run({ args }) {
    assertImagesGiven(args._.map(String));
    const ctx = ctxFrom(args, { existing: true });
    try {
      const r = await removeImages(ctx, args._.map(String));
      ctx.progress?.done(); // a "waiting for image" line must not run into the output
      if (args.json) printJson({ ok: true, ...r }, "remove");
      else {
        for (const i of r.images) {
          const snaps = i.active_snapshots ? `; ${i.active_snapshots} active snapshot(s) keep working until released` : "";
          const what =
            i.state === "already_removed"
              ? "was already removed"
              : `removed: ${i.released_layers.length} layer(s) released, ${i.shared_layers} shared layer(s) kept${snaps}`;
          process.stdout.write(`image ${i.name}: ${what}\n`);
        }
        if (r.images.some((i) => i.released_layers.length))
          process.stdout.write("run `bun scripts/gc.ts --force` to free their space (after the grace period, --grace)\n");
      }
    } finally {
      ctx.progress?.done();
      ctx.db.close();
    }
  },
});

export default removeCommand;
