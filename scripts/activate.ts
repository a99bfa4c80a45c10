// bun scripts/activate.ts IMAGE — a fresh thin snapshot of the image's top layer; prints its device path.
import { defineCommand } from "citty";
import { printJson, runMain } from "../lib/cli/main.ts";
import { activate } from "../lib/pipeline/activate.ts";
import { asHolder, ctxFrom, pipelineArgs } from "../lib/pipeline/cli.ts";

export const activateCommand = defineCommand({
  meta: { name: "activate", description: "Activate a fresh snapshot of an unpacked image and print its /dev/mapper path" },
  args: {
    image: { type: "positional", description: "Image name (or id) from `bun scripts/list.ts`", required: true },
    ...pipelineArgs,
  },
  async run({ args }) {
    const ctx = ctxFrom(args);
    try {
      const r = await asHolder(ctx, () => activate(ctx, args.image));
      if (args.json) printJson({ ok: true, ...r });
      else process.stdout.write(`${r.device_path}\n`);
    } finally {
      ctx.db.close();
    }
  },
});

if (import.meta.main) await runMain(activateCommand);
