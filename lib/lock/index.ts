// lib/lock: the process lock file, named SQLite locks, and the in-process section mutex.

export * from "./holders.ts";
export * from "./named-lock.ts";
export * from "./owner.ts";
export * from "./process-lock.ts";
export * from "./section.ts";
