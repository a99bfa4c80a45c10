// The command journal: <state dir>/commands.log. Before a state-changing command is spawned its
// before-record is appended and fsync'd, so after a panic or a hard reboot the last command sent to
// the kernel is on disk; its after-record follows (written, not fsync'd: the next before-record's
// fsync carries it to disk). Bounded: past MAX_BYTES the file is rotated
// (commands.log.1 … .KEEP). Appends and rotations happen under the host dm queue (one writer at a
// time on the host). A journal that cannot be written never stops dm work: one warning per process.
import { closeSync, fstatSync, fsyncSync, mkdirSync, openSync, renameSync, statSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import { log } from "./log.ts";

export const JOURNAL_FILE = "commands.log";
export const JOURNAL_MAX_BYTES = 4 * 1024 * 1024;
export const JOURNAL_KEEP = 3;

let dir: string | null = null;
let warned = false;

/** Journal the commands of this process into `stateDir` (null: no journal). */
export function useCommandJournal(stateDir: string | null): void {
  if (stateDir !== dir) closeOpen();
  dir = stateDir;
}

export function journalPath(stateDir: string): string {
  return join(stateDir, JOURNAL_FILE);
}

function rotate(path: string): void {
  for (let i = JOURNAL_KEEP - 1; i >= 1; i--) {
    try {
      renameSync(`${path}.${i}`, `${path}.${i + 1}`);
    } catch {}
  }
  renameSync(path, `${path}.1`);
}

/** The journal file this process has open (kept open: a long-lived service writes four records per
 * activation, and each open/close is a round trip to the host in the test VM's hostfs). */
let open: { path: string; fd: number; ino: number; dev: number } | null = null;

function closeOpen(): void {
  if (!open) return;
  try {
    closeSync(open.fd);
  } catch {}
  open = null;
}

/** An fd appending to the file now at `path`, rotated first when full. Another process may have
 * rotated it meanwhile: the open fd is used only while `path` still names its file. */
function journalFd(path: string, maxBytes: number): number {
  let st = statOrNull(path);
  if (st && st.size >= maxBytes) {
    rotate(path);
    st = null;
  }
  if (open && st && open.path === path && st.ino === open.ino && st.dev === open.dev) return open.fd;
  closeOpen();
  mkdirSync(dirname(path), { recursive: true });
  const fd = openSync(path, "a", 0o644);
  const f = fstatSync(fd);
  open = { path, fd, ino: f.ino, dev: f.dev };
  return fd;
}

function statOrNull(path: string): { size: number; ino: number; dev: number } | null {
  try {
    return statSync(path);
  } catch {
    return null;
  }
}

/** Append one record; with sync, fsync it before returning. */
export function journal(rec: object, o: { sync: boolean; maxBytes?: number } = { sync: true }): void {
  if (dir === null) return;
  const path = journalPath(dir);
  try {
    const fd = journalFd(path, o.maxBytes ?? JOURNAL_MAX_BYTES);
    writeSync(fd, `${JSON.stringify(rec)}\n`);
    if (o.sync) fsyncSync(fd);
  } catch (e) {
    closeOpen();
    if (warned) return;
    warned = true;
    log.warn(`cannot write the command journal ${path}: ${(e as Error).message} (dm work goes on; records stay on stderr)`);
  }
}

/** fsync what this process has written to the journal with sync: false and not flushed since. */
export function syncJournal(): void {
  if (!open) return;
  const { fd, path } = open;
  try {
    fsyncSync(fd);
  } catch (e) {
    closeOpen();
    if (warned) return;
    warned = true;
    log.warn(`cannot flush the command journal ${path}: ${(e as Error).message} (dm work goes on)`);
  }
}
