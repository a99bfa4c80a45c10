// bun scripts/extract.ts SOURCE DEST [--devices] [--json] [--max-entries N] [--max-bytes SIZE]
//   [--max-file-size SIZE] [--max-depth N] [--max-path-bytes N] [--max-blob-size SIZE]
//   [--select REF] [--platform os/arch] [--state-dir DIR]
// Fetch an image (path, http(s)://…, s3://bucket/key or s3://bucket/prefix/), recognise its format
// (layer family, docker-archive, OCI layout) and apply its layers, in order, into the plain directory
// DEST (absent or empty). No devicemapper. Exit 0 with a summary; non-zero with one line otherwise.
import { defineCommand } from "citty";
import { loadConfig } from "../../config.ts";
import { extractImage, summaryJson } from "../../image/extract.ts";
import { formatBytes } from "../../util/units.ts";
import { limitArgs, limitInput, outputArgs, stateArgs } from "../args.ts";
import { printJson } from "../main.ts";
import { ttyProgress } from "../progress.ts";

export const extractCommand = defineCommand({
  meta: {
    name: "extract",
    description: "Extract an image (layer family, docker-archive or OCI layout; local, HTTP(S) or S3) into a plain directory",
  },
  args: {
    source: {
      type: "positional",
      description: "Image: PATH, http(s)://…, s3://BUCKET/KEY or s3://BUCKET/PREFIX/ (append :TAG to choose an image)",
      required: true,
    },
    dest: { type: "positional", description: "Destination directory (must not exist, or be empty)", required: true },
    devices: { type: "boolean", description: "Create device nodes and FIFOs (needs root)", default: false },
    select: { type: "string", description: "Tag / org.opencontainers.image.ref.name to extract (same as SOURCE:REF)" },
    platform: { type: "string", description: "os/arch[/variant] for multi-arch images (default: this host)" },
    ...limitArgs,
    ...stateArgs,
    ...outputArgs,
  },
  async run({ args }) {
    const cfg = loadConfig({ stateDir: args["state-dir"], ...limitInput(args) });
    const { maxEntries, maxLayerBytes: maxTotalBytes, maxFileBytes, maxBlobBytes, maxDepth, maxPathBytes } = cfg.limits;
    const progress = args.json || args["log-format"] === "json" ? undefined : ttyProgress(process.stderr);

    const s = await extractImage(args.source, args.dest, {
      stateDir: cfg.stateDir,
      devices: args.devices,
      limits: { maxEntries, maxTotalBytes, maxFileBytes, maxDepth, maxPathBytes },
      maxBlobBytes,
      ...(args.select ? { select: args.select } : {}),
      ...(args.platform ? { platform: args.platform } : {}),
      ...(progress ? { progress } : {}),
    });
    if (args.json) {
      printJson({ ok: true, ...summaryJson(s) }, "extract");
      return;
    }
    const what = [s.format, s.name, s.platform].filter(Boolean).join(", ");
    process.stdout.write(
      `extracted ${s.source} (${what}) into ${s.dest}: ${s.layers.length} layers, ${s.entries} entries${s.skipped ? ` (${s.skipped} skipped)` : ""}, ${formatBytes(s.bytes)} in ${s.seconds.toFixed(2)} s\n`,
    );
  },
});

export default extractCommand;
