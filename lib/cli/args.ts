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
      "A device-mapper/I/O error in the kernel log blocks dm work until it is this old or acknowledged (health --ack); env THINIMG_KERNEL_ERROR_WINDOW; default 15m",
  },
} as const satisfies ArgsDef;

export const dryRunArgs = {
  "dry-run": { type: "boolean", description: "Print what would be done; change nothing", default: false },
} as const satisfies ArgsDef;
