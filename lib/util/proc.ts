// Host processes by process group, read from /proc (synchronous: also used on "exit").
import { readdirSync, readFileSync } from "node:fs";

/** Live processes (pid, state) in these process groups; zombies and dead ones excluded. */
export function groupProcesses(groups: Iterable<number>): { pid: number; state: string }[] {
  const want = new Set(groups);
  const left: { pid: number; state: string }[] = [];
  let pids: string[];
  try {
    pids = readdirSync("/proc");
  } catch {
    return left;
  }
  for (const p of pids) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const stat = readFileSync(`/proc/${p}/stat`, "latin1");
      // fields after "(comm) ": state, ppid, pgrp, …
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (want.has(Number(f[2])) && f[0] !== "Z" && f[0] !== "X") left.push({ pid: Number(p), state: f[0]! });
    } catch {}
  }
  return left;
}
