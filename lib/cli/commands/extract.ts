// bun scripts/extract.ts SOURCE DEST [--devices] [--json] [--max-entries N] [--max-bytes SIZE]
//   [--max-file-size SIZE] [--max-depth N] [--max-path-bytes N] [--max-blob-size SIZE]
//   [--select REF] [--platform os/arch] [--state-dir DIR]
// Fetch an image (path, http(s)://…, s3://bucket/key or s3://bucket/prefix/), recognise its format
// (layer family, docker-archive, OCI layout) and apply its layers, in order, into the plain directory
// DEST (absent or empty). No devicemapper. Exit 0 with a summary; non-zero with one line otherwise.
import { defineCommand } from "citty";
import { loadConfig } from "../../config.ts";
import { DEFAULT_LIMITS } from "../../image/apply/index.ts";
import { extractImage, summaryJson } from "../../image/extract.ts";
import { formatBytes, parseIntArg, parseSize } from "../../util/units.ts";
import { outputArgs, stateArgs } from "../args.ts";
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
    const cfg = loadConfig({ stateDir: args["state-dir"] });
    const maxEntries = args["max-entries"] ? parseIntArg(args["max-entries"], "--max-entries", { min: 1 }) : cfg.limits.maxEntries;
    const maxTotalBytes = args["max-bytes"] ? parseSize(args["max-bytes"], "--max-bytes") : cfg.limits.maxLayerBytes;
    const maxFileBytes = args["max-file-size"] ? parseSize(args["max-file-size"], "--max-file-size") : cfg.limits.maxFileBytes;
    const maxBlobBytes = args["max-blob-size"] ? parseSize(args["max-blob-size"], "--max-blob-size") : cfg.limits.maxBlobBytes;
    const maxDepth = intLimit(args["max-depth"], "--max-depth", "THINIMG_MAX_DEPTH", DEFAULT_LIMITS.maxDepth);
    const maxPathBytes = intLimit(args["max-path-bytes"], "--max-path-bytes", "THINIMG_MAX_PATH_BYTES", DEFAULT_LIMITS.maxPathBytes);
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

/** A whole-number limit from its flag, else its environment variable, else the default. */
function intLimit(flag: string | undefined, flagName: string, envName: string, dflt: number): number {
  if (flag) return parseIntArg(flag, flagName, { min: 1 });
  const env = process.env[envName];
  return env ? parseIntArg(env, envName, { min: 1 }) : dflt;
}

export default extractCommand;
