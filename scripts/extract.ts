// bun scripts/extract.ts SOURCE DEST [--devices] [--json] [--max-entries N] [--max-bytes SIZE]
//   [--max-file-size SIZE] [--max-depth N] [--max-path-bytes N] [--max-blob-size SIZE]
//   [--select REF] [--platform os/arch] [--state-dir DIR]
// Fetch an image (path, http(s)://…, s3://bucket/key or s3://bucket/prefix/), recognise its format
// (layer family, docker-archive, OCI layout) and apply its layers, in order, into the plain directory
// DEST (absent or empty). No devicemapper. Exit 0 with a summary; non-zero with one line otherwise.
import { defineCommand } from "citty";
import { outputArgs, stateArgs } from "../lib/cli/args.ts";
import { printJson, runMain } from "../lib/cli/main.ts";
import { ttyProgress } from "../lib/cli/progress.ts";
import { loadConfig } from "../lib/config.ts";
import { extractImage, summaryJson } from "../lib/image/extract.ts";
import { formatBytes } from "../lib/util/units.ts";

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
    "max-entries": { type: "string", description: "Most entries per layer and in the image (default 100000; env THINIMG_MAX_ENTRIES)" },
    "max-bytes": {
      type: "string",
      alias: ["max-total-bytes"],
      description: "Most uncompressed bytes per layer and in the image (default 10G; env THINIMG_MAX_LAYER_SIZE)",
    },
    "max-file-size": { type: "string", description: "Largest single file (default 1G; env THINIMG_MAX_FILE_SIZE)" },
    "max-blob-size": { type: "string", description: "Largest download / blob as stored (default 8G; env THINIMG_MAX_BLOB_SIZE)" },
    "max-depth": {
      type: "string",
      description: "Most path components of an entry, or of a path a link resolves to (default 1024; env THINIMG_MAX_DEPTH)",
    },
    "max-path-bytes": {
      type: "string",
      description: "Longest entry name or link target in bytes (default 4096; env THINIMG_MAX_PATH_BYTES)",
    },
    ...stateArgs,
    ...outputArgs,
  },
  async run({ args }) {
    const cfg = loadConfig({
      stateDir: args["state-dir"],
      limits: {
        maxEntries: args["max-entries"],
        maxLayerBytes: args["max-bytes"],
        maxFileBytes: args["max-file-size"],
        maxBlobBytes: args["max-blob-size"],
        maxDepth: args["max-depth"],
        maxPathBytes: args["max-path-bytes"],
      },
    });
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

if (import.meta.main) await runMain(extractCommand);
