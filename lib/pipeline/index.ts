// lib/pipeline: unpack, activate, release, remove, prune, inventory — the operations the scripts expose.
export * from "./activate.ts";
export * from "./chain.ts";
export * from "./context.ts";
export * from "./failure.ts";
export * from "./inventory.ts";
export * from "./names.ts";
export * from "./progress.ts";
export * from "./prune.ts";
export * from "./remove.ts";
export * from "./txn.ts";
export * from "./unpack.ts";
