// Who holds a lock, and whether that holder still exists. A PID alone is not enough: PIDs are
// reused, so we also record the process start time (/proc/PID/stat field 22, clock ticks since
// boot) and treat a different start time as a dead holder.
import { readFileSync } from "node:fs";
import { hostname } from "node:os";

export interface Holder {
  pid: number;
  /** /proc/PID/stat field 22; null where /proc is unavailable. */
  startTime: number | null;
  host: string;
  command: string;
  /** Unix ms. */
  acquiredAt: number;
}

/** This process's own start time never changes: read once (every lock and ticket asks for it). */
let ownStartTime: number | null | undefined;

/** Field 22 of /proc/PID/stat, or null when the process does not exist. */
export function processStartTime(pid: number): number | null {
  if (pid === process.pid) {
    if (ownStartTime === undefined) ownStartTime = readStartTime(pid);
    return ownStartTime;
  }
  return readStartTime(pid);
}

function readStartTime(pid: number): number | null {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return null;
  }
  // comm (field 2) is in parentheses and may contain spaces or ')': split after the LAST ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // rest[0] is field 3 (state), so field 22 is rest[19]
  const v = Number(rest[19]);
  return Number.isFinite(v) ? v : null;
}

export function pidAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: exists but not ours to signal — still alive
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

export function commandLine(): string {
  const argv = process.argv.slice(1).map((a) => a.replace(/^.*\/(scripts|ops|test)\//, "$1/"));
  return `bun ${argv.join(" ")}`.slice(0, 500);
}

export function currentHolder(command = commandLine()): Holder {
  return { pid: process.pid, startTime: processStartTime(process.pid), host: hostname(), command, acquiredAt: Date.now() };
}

export type Staleness = { stale: false } | { stale: true; why: string };

/** Why the process (pid, start time) of this host is gone, or null while it runs. */
export function goneReason(pid: number, startTime: number | null): string | null {
  const st = processStartTime(pid);
  if (st === null) return pidAlive(pid) ? null : `pid ${pid} is not running`; // no /proc: trust kill(0)
  if (startTime !== null && st !== startTime) return `pid ${pid} was reused (start time ${st}, lock says ${startTime})`;
  return null;
}

/** Same host: dead PID or changed start time → stale. Other host: we cannot tell → live. */
export function staleness(h: Pick<Holder, "pid" | "startTime" | "host">): Staleness {
  if (h.host !== hostname()) return { stale: false };
  const why = goneReason(h.pid, h.startTime);
  return why === null ? { stale: false } : { stale: true, why };
}

export function isSelf(h: Pick<Holder, "pid" | "startTime" | "host">): boolean {
  return h.pid === process.pid && h.host === hostname() && h.startTime === processStartTime(process.pid);
}

export function describeHolder(h: Holder): string {
  const ago = Math.max(0, Math.round((Date.now() - h.acquiredAt) / 1000));
  return `pid ${h.pid} (${h.command}) on ${h.host} since ${new Date(h.acquiredAt).toISOString()} (${ago} s ago)`;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
