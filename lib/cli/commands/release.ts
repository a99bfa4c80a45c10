// bun scripts/release.ts SNAPSHOT — deactivate a snapshot and mark it released (GC deletes its thin id).
import { defineCommand } from "citty";
import { release } from "../../pipeline/activate.ts";
import { printJson, printText } from "../main.ts";
import { asHolder, ctxFrom, pipelineArgs } from "../pipeline.ts";

export const releaseCommand = defineCommand({
  meta: { name: "release", description: "Release an activated snapshot (its device is removed; `bun scripts/gc.ts` deletes the thin id later)" },
  args: {
    snapshot: { type: "positional", description: "Snapshot id, device name, or /dev/mapper path", required: true },
    ...pipelineArgs,
  },
  async run({ args }) {
    const ctx = ctxFrom(args, { existing: true });
    try {
      const r = await asHolder(ctx, () => release(ctx, args.snapshot));
      if (args.json) printJson({ ok: true, ...r }, "release");
      else printText(`snapshot ${r.snapshot_id} (${r.device_name}) ${r.state === "released" ? "released" : "was already released"}\n`);
    } finally {
      ctx.db.close();
    }
  },
});

export default releaseCommand;
