// The host-wide dm queue: every state-changing dm, loop, mkfs, mount and umount command that any
// thinimg process runs holds it for exactly that command (lib/exec.ts run() routes them here), so no
// two such commands reach the kernel at once, from any number of processes. Reads (status, info, ls,
// table, thin_ls…) and everything that is not a command (downloads, hashing, writing files into a
// mounted layer) do not queue, so two unpacks still overlap their I/O.
//
//   - The lock is an flock (util/flock.ts) on /run/thinimg/dm-queue.lock (THINIMG_DM_QUEUE
//     overrides): the kernel drops it when its holder dies, so a crashed holder never blocks. /run, not the state dir: the
//     kernel is shared by every state dir on the host.
//   - Order: inside one process a FIFO; across processes each waiter leaves a ticket in
//     <lock>.waiting/ and only the oldest live ticket tries the lock (a dead or reused PID's ticket
//     is ignored and removed), so commands run in the order asked. With no ticket there at all, the
//     lock is tried at once without leaving one (nobody asked before us; a waiter arriving later
//     leaves its ticket and waits its turn): the common, uncontended case costs one flock.
//   - Waiting is bounded (THINIMG_DM_QUEUE_WAIT, default 5m) and visible: after 1 s a waiter logs
//     "waiting for the dm queue held by pid N (…): `cmd`"; the holder writes who it is into the file.
//   - withHostQueue(fn) holds it across several commands (suspend → … → resume; GC's batch of bare
//     deletes, which lets go as soon as queueWanted() says someone waits): commands fn runs (same
//     async call chain) go straight through; other callers wait.
//   - A command that timed out may still be running in the kernel: no later state-changing command
//     of this process may touch the same device or path (resume excepted: a suspend that timed out
//     must still be resumed, ADR-0001 §5).
import type { AsyncLocalStorage } from "node:async_hooks";
import { mkdirSync, readdirSync, unlinkSync, writeFileSync } from "node:fs";
import { basename } from "node:path";
import { envDuration } from "../config.ts";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { readFlockRecord, tryFlock } from "../util/flock.ts";
import { SerialQueue } from "../util/serial-queue.ts";
import { commandLine, goneReason, processStartTime } from "./owner.ts";

export const DEFAULT_QUEUE_FILE = "/run/thinimg/dm-queue.lock";
export const DEFAULT_QUEUE_WAIT_MS = 5 * 60_000;
const ANNOUNCE_AFTER_MS = 1_000;
const POLL_MS = 10;

export function queueFile(): string {
  return process.env.THINIMG_DM_QUEUE || DEFAULT_QUEUE_FILE;
}

function queueWaitMs(): number {
  return envDuration("THINIMG_DM_QUEUE_WAIT", DEFAULT_QUEUE_WAIT_MS);
}

// ---- which commands queue ----

const DMSETUP_READS = new Set(["status", "info", "ls", "table", "targets", "version", "deps", "help", "splitname"]);
const LOSETUP_READS = new Set(["--list", "-l", "--all", "-a", "--associated", "-j", "--json", "--output", "-O"]);

/** True for a command that changes kernel state (devices, tables, loops, filesystems, mounts). */
export function isStateChanging(argv: readonly string[]): boolean {
  const tool = basename(argv[0] ?? "");
  const rest = argv.slice(1);
  if (tool === "dmsetup") {
    const sub = rest.find((a) => !a.startsWith("-"));
    return sub !== undefined && !DMSETUP_READS.has(sub);
  }
  if (tool === "losetup") return rest.length > 0 && !rest.some((a) => LOSETUP_READS.has(a));
  // e2fsck -p and resize2fs write a filesystem on a dm device, like mkfs
  return tool === "mount" || tool === "umount" || tool.startsWith("mkfs") || tool === "mke2fs" || tool === "e2fsck" || tool === "resize2fs";
}

// ---- devices a timed-out command may still be working on ----

const tainted = new Map<string, string>();

/** What a command's record names (exec.ts's CmdContext): its device, if any. */
export interface CmdTarget {
  device_name?: string | undefined;
}

/** The device names and paths a command acts on (its ctx device, its absolute-path arguments). */
function targetsOf(argv: readonly string[], ctx: CmdTarget | undefined): string[] {
  const t = argv.slice(1).filter((a) => a.startsWith("/"));
  for (const a of t) if (a.startsWith("/dev/mapper/")) t.push(a.slice("/dev/mapper/".length));
  if (ctx?.device_name) t.push(ctx.device_name);
  return t;
}

/** Refuse a state-changing command on a device or path an earlier command of this run timed out on. */
export function assertNotTainted(argv: readonly string[], ctx: CmdTarget | undefined): void {
  if (basename(argv[0] ?? "") === "dmsetup" && argv.includes("resume")) return;
  for (const t of targetsOf(argv, ctx)) {
    const earlier = tainted.get(t);
    if (earlier === undefined) continue;
    throw new ThinimgError(
      "timeout",
      `refusing \`${argv.join(" ")}\`: \`${earlier}\` on ${t} timed out earlier in this run and may still be running in the kernel`,
      {
        hint: "nothing more is sent to that device in this run; review with `bun scripts/gc.ts` (dry-run), remove with `bun scripts/gc.ts --force` once the host is healthy",
        details: { device: t, timed_out_command: earlier },
      },
    );
  }
}

export function noteTimeout(argv: readonly string[], ctx: CmdTarget | undefined): void {
  for (const t of targetsOf(argv, ctx)) tainted.set(t, argv.join(" "));
}

/** Forget timed-out devices (unit tests only: a process's run is its lifetime). */
export function clearTimeouts(): void {
  tainted.clear();
}

// ---- the lock ----

interface QueueHolder {
  pid: number;
  process: string;
  command: string;
}

function readHolder(path: string): QueueHolder | null {
  try {
    const j = JSON.parse(readFlockRecord(path) ?? "") as Partial<QueueHolder>;
    return typeof j.pid === "number" ? { pid: j.pid, process: String(j.process ?? ""), command: String(j.command ?? "") } : null;
  } catch {
    return null; // free, or the holder is writing its line right now
  }
}

const describe = (h: QueueHolder | null) => (h ? `pid ${h.pid} (${h.process}): \`${h.command}\`` : "another process");

/** "<ms>-<pid>-<start time>": sorted by the time asked; the pid and start time tell a live ticket. */
function ticketName(): string {
  return `${String(Date.now()).padStart(15, "0")}-${process.pid}-${processStartTime(process.pid) ?? 0}`;
}

/** The waiting room: ticket names, or null when the directory does not exist (yet). */
function tickets(dir: string): string[] | null {
  try {
    return readdirSync(dir);
  } catch {
    return null;
  }
}

/** True when a live waiter asked before `mine`. Tickets of dead or reused PIDs are removed. */
function olderLiveTicket(dir: string, mine: string): boolean {
  for (const n of tickets(dir) ?? []) {
    if (n >= mine) continue;
    const [, pid, start] = n.split("-");
    if (goneReason(Number(pid), start === "0" ? null : Number(start)) === null) return true;
    try {
      unlinkSync(`${dir}/${n}`);
    } catch {}
  }
  return false;
}

/** Take the host lock for `command`, waiting (bounded, visibly) behind earlier askers. */
async function acquire(command: string): Promise<() => void> {
  const path = queueFile();
  const waitDir = `${path}.waiting`;
  const record = JSON.stringify({ pid: process.pid, process: commandLine(), command, since: new Date().toISOString() });
  const waiting = tickets(waitDir);
  if (waiting === null)
    mkdirSync(waitDir, { recursive: true, mode: 0o755 }); // and the lock's own directory
  else if (waiting.length === 0) {
    const lock = tryFlock(path, { record, mode: 0o644 });
    if (lock) return () => lock.release();
  }
  const ticket = ticketName();
  writeFileSync(`${waitDir}/${ticket}`, "");
  const t0 = Date.now();
  const limit = queueWaitMs();
  let announced = false;
  try {
    for (;;) {
      const lock = olderLiveTicket(waitDir, ticket) ? null : tryFlock(path, { record, mode: 0o644 });
      if (lock) return () => lock.release();
      const waited = Date.now() - t0;
      if (waited >= limit) {
        throw new ThinimgError(
          "timeout",
          `gave up after ${Math.round(waited / 1000)} s waiting for the dm queue held by ${describe(readHolder(path))} to run \`${command}\``,
          {
            hint: "a dm command on this host is slow or hung: check it (ps, dmesg, bun scripts/health.ts); THINIMG_DM_QUEUE_WAIT raises the limit",
          },
        );
      }
      if (!announced && waited >= ANNOUNCE_AFTER_MS) {
        announced = true;
        log.info(`waiting for the dm queue held by ${describe(readHolder(path))} (to run \`${command}\`)`);
      }
      await Bun.sleep(POLL_MS);
    }
  } finally {
    try {
      unlinkSync(`${waitDir}/${ticket}`);
    } catch {}
  }
}

const inProcess = new SerialQueue();
/** The hold this async call chain runs in. Compared with the live one, so a context that outlived
 * its hold (a callback registered inside, run later) never skips the queue. */
// Created at the first hold: node:async_hooks is a measurable part of the start of a command that
// never holds the queue (list); before it exists, no call chain holds anything.
let holding: AsyncLocalStorage<object> | undefined;
let liveHold: object | null = null;

/** Run fn holding the host queue. Nested calls in fn's async call chain share the hold. */
export function withHostQueue<T>(label: string, fn: () => Promise<T>): Promise<T> {
  const mine = holding?.getStore();
  if (mine !== undefined && mine === liveHold) return fn();
  return inProcess.run(async () => {
    holding ??= new (await import("node:async_hooks")).AsyncLocalStorage<object>();
    const release = await acquire(label);
    const hold = {};
    liveHold = hold;
    try {
      return await holding.run(hold, fn);
    } finally {
      liveHold = null;
      release();
    }
  });
}

/**
 * Someone else wants the queue: another async path of this process, or another process (its ticket
 * is in the waiting room: a waiter that finds the lock taken always leaves one). A caller holding
 * the queue across a batch of commands (withHostQueue around them) lets go at the next command
 * boundary when this is true, so a waiter still gets its turn after at most one more command, as
 * when every command takes the queue on its own.
 */
export function queueWanted(): boolean {
  if (inProcess.pending > 1) return true; // the hold itself is one
  return (tickets(`${queueFile()}.waiting`)?.length ?? 0) > 0;
}

/** Commands queued or running in this process (tests, diagnostics). */
export function queuedHere(): number {
  return inProcess.pending;
}
