// bun scripts/activate.ts IMAGE [--size 20G] — a fresh thin snapshot of the image's top layer; prints its device path.
import { defineCommand } from "citty";
import { printJson, runMain } from "../lib/cli/main.ts";
import { activate } from "../lib/pipeline/activate.ts";
import { ctxFrom, pipelineArgs } from "../lib/pipeline/cli.ts";
import { parseSize } from "../lib/util/units.ts";

export const activateCommand = defineCommand({
  meta: { name: "activate", description: "Activate a fresh snapshot of an unpacked image and print its /dev/mapper path" },
  args: {
    image: { type: "positional", description: "Image name (or id) from `bun scripts/list.ts`", required: true },
    size: { type: "string", description: "Snapshot size (e.g. 20G): larger than the image, its ext4 grown to fill it (default: the image's size)" },
    ...pipelineArgs,
  },
  async run({ args }) {
    const ctx = ctxFrom(args);
    try {
      const r = await activate(ctx, args.image, args.size === undefined ? {} : { size: parseSize(args.size, "--size") });
      if (args.json) printJson({ ok: true, ...r });
      else process.stdout.write(`${r.device_path}\n`);
    } finally {
      ctx.db.close();
    }
  },
});

if (import.meta.main) await runMain(activateCommand);
