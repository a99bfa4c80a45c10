// Argument definitions shared by every script, so flags mean the same thing everywhere.
import type { ArgsDef } from "citty";

export const outputArgs = {
  json: { type: "boolean", description: "Print machine-readable JSON on stdout (stable keys)", default: false },
  "log-format": { type: "enum", options: ["human", "json"], description: "Log format on stderr", default: "human" },
  verbose: { type: "boolean", alias: "v", description: "Log every external command", default: false },
} as const satisfies ArgsDef;

export const stateArgs = {
  "state-dir": {
    type: "string",
    description: "State directory (SQLite DB, blob cache, locks); env THINIMG_STATE_DIR",
  },
} as const satisfies ArgsDef;

export const poolArgs = {
  pool: { type: "string", description: "Thin-pool name; env THINIMG_POOL (default thinimg-pool)" },
} as const satisfies ArgsDef;

export const kernelWindowArgs = {
  "kernel-error-window": {
    type: "string",
    description:
      "A device-mapper/I/O error in the kernel log blocks dm work until it is this old or acknowledged (`bun scripts/health.ts --ack`); env THINIMG_KERNEL_ERROR_WINDOW; default 15m",
  },
} as const satisfies ArgsDef;

export const dryRunArgs = {
  "dry-run": { type: "boolean", description: "Print what would be done; change nothing", default: false },
} as const satisfies ArgsDef;

/** The image limits (unpack, extract, serve): what a hostile or broken image may not exceed. The
 * limit errors name these flags in their hints. */
export const limitArgs = {
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
  "max-path-bytes": { type: "string", description: "Longest entry name or link target in bytes (default 4096; env THINIMG_MAX_PATH_BYTES)" },
} as const satisfies ArgsDef;

export interface LimitFlags {
  "max-entries"?: string | undefined;
  "max-bytes"?: string | undefined;
  "max-file-size"?: string | undefined;
  "max-blob-size"?: string | undefined;
  "max-depth"?: string | undefined;
  "max-path-bytes"?: string | undefined;
}

/** The limit flags as lib/config.ts's input. */
export function limitInput(a: LimitFlags) {
  return {
    maxEntries: a["max-entries"],
    maxBytes: a["max-bytes"],
    maxFileSize: a["max-file-size"],
    maxBlobSize: a["max-blob-size"],
    maxDepth: a["max-depth"],
    maxPathBytes: a["max-path-bytes"],
  };
}
