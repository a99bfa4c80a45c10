// lib/lock: every lock — the process lock, the state dir holders, the host dm queue, named SQLite locks, pool sections.

export * from "./holders.ts";
export * from "./named-lock.ts";
export * from "./owner.ts";
export * from "./process-lock.ts";
export * from "./section.ts";
