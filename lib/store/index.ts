// lib/store: the SQLite state. Import the concept modules as namespaces or use the re-exports.
export * from "./blobs.ts";
export * from "./db.ts";
export * from "./devices.ts";
export * from "./images.ts";
export * from "./layers.ts";
export * from "./locks.ts";
export { MIGRATIONS, migrate } from "./migrations.ts";
export * from "./mounts.ts";
export * from "./snapshots.ts";
export * from "./thin-ids.ts";
export * from "./work.ts";
