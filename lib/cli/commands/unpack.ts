// bun scripts/unpack.ts SOURCE [--name NAME] — turn an image into thin devices (one per layer,
// shared between images). Re-running for an unpacked image does no device work.

import { defineCommand } from "citty";
import { unpack } from "../../pipeline/unpack.ts";
import { limitArgs } from "../args.ts";
import { printJson, printText } from "../main.ts";
import { asHolder, ctxFrom, pipelineArgs, sizeArgs } from "../pipeline.ts";

export const unpackCommand = defineCommand({
  meta: { name: "unpack", description: "Unpack an image (layer family dir/S3 prefix, docker-archive, OCI layout; local, HTTP(S) or S3) into thin devices" },
  args: {
    source: { type: "positional", description: "Image source: path, http(s)://…, s3://bucket/key; SOURCE:REF selects a tag", required: true },
    name: { type: "string", description: "Image name (default: from the source)" },
    platform: { type: "string", description: "os/arch[/variant] for multi-platform images" },
    refresh: { type: "boolean", description: "Resolve the source again even if the image is already unpacked", default: false },
    ...sizeArgs,
    ...limitArgs,
    ...pipelineArgs,
  },
  async run({ args }) {
    const ctx = ctxFrom(args);
    try {
      const r = await asHolder(ctx, () => unpack(ctx, { source: args.source, name: args.name, platform: args.platform, refresh: args.refresh }));
      ctx.progress?.done();
      if (args.json) printJson({ ok: true, ...r }, "unpack");
      else {
        const verb = r.dm_work ? "unpacked" : r.waited ? "unpacked by another process; reused" : "already unpacked";
        const lines = [`image ${r.image.name}: ${verb} — ${r.layers.length} layers (${r.built} built, ${r.reused} reused) in ${r.duration_ms} ms`];
        for (const l of r.layers)
          lines.push(`  ${l.index + 1}. ${l.device_name}  thin ${l.thin_id}  ${l.reused ? "reused" : "built"}  ${l.chain_id.slice(0, 19)}…`);
        printText(`${lines.join("\n")}\n`);
      }
    } finally {
      ctx.progress?.done();
      ctx.db.close();
    }
  },
});

export default unpackCommand;
