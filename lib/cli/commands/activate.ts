// bun scripts/activate.ts IMAGE [--size 20G] — a fresh thin snapshot of the image's top layer; prints its device path.
// bun scripts/activate.ts --snapshot ID|NAME — load an existing (handed-out) snapshot's device again
// after a reboot: same name, same thin id, same size, same data.
import { defineCommand } from "citty";
import { usageError } from "../../errors.ts";
import { activate } from "../../pipeline/activate.ts";
import { reattach } from "../../pipeline/reattach.ts";
import { parseSize } from "../../util/units.ts";
import { printJson, printText } from "../main.ts";
import { asHolder, ctxFrom, pipelineArgs } from "../pipeline.ts";

export const activateCommand = defineCommand({
  meta: { name: "activate", description: "Activate a fresh snapshot of an unpacked image (or re-attach an existing one) and print its /dev/mapper path" },
  args: {
    image: { type: "positional", description: "Image name (or id) from `bun scripts/list.ts`", required: false },
    snapshot: { type: "string", description: "Re-attach this existing snapshot (id, device name or /dev/mapper path) instead: same device, same data" },
    size: { type: "string", description: "Snapshot size (e.g. 20G): larger than the image, its ext4 grown to fill it (default: the image's size)" },
    ...pipelineArgs,
  },
  async run({ args }) {
    if (!args.image === !args.snapshot) throw usageError("give either IMAGE (a new snapshot) or --snapshot ID (re-attach an existing one)");
    if (args.snapshot && args.size !== undefined) throw usageError("--size applies to a new snapshot; a re-attached one keeps its recorded size");
    const size = args.size === undefined ? {} : { size: parseSize(args.size, "--size") };
    const ctx = ctxFrom(args, { existing: true });
    try {
      const r = await asHolder(ctx, () => (args.snapshot ? reattach(ctx, args.snapshot) : activate(ctx, args.image!, size)));
      if (args.json) printJson({ ok: true, ...r }, "activate");
      else printText(`${r.device_path}\n`);
    } finally {
      ctx.db.close();
    }
  },
});

export default activateCommand;
