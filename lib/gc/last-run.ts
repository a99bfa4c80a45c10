// The last GC run's summary, kept in the state dir (gc-last-run.json) so the service can export it
// as metrics without running GC itself. Written by scripts/gc.ts after each run (atomically).
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { GcReport } from "./report.ts";

export interface LastGcRun {
  ok: boolean;
  mode: GcReport["mode"];
  started_at: string;
  duration_ms: number;
  summary: GcReport["summary"];
}

const fileOf = (stateDir: string) => join(stateDir, "gc-last-run.json");

export function writeLastGcRun(stateDir: string, r: GcReport): void {
  const last: LastGcRun = { ok: r.ok, mode: r.mode, started_at: r.started_at, duration_ms: r.duration_ms, summary: r.summary };
  const tmp = `${fileOf(stateDir)}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(last)}\n`, { mode: 0o600 });
  renameSync(tmp, fileOf(stateDir));
}

/** null when GC never ran here (or the file is unreadable: metrics then show no GC run). */
export function readLastGcRun(stateDir: string): LastGcRun | null {
  try {
    return JSON.parse(readFileSync(fileOf(stateDir), "utf8")) as LastGcRun;
  } catch {
    return null;
  }
}
