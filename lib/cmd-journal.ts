// The command journal: <state dir>/commands.log. Before a state-changing command is spawned its
// before-record is appended and fsync'd, so after a panic or a hard reboot the last command sent to
// the kernel is on disk; its after-record follows (written, not fsync'd: the next before-record's
// fsync carries it to disk). Bounded: past MAX_BYTES the file is rotated
// (commands.log.1 … .KEEP). Appends and rotations happen under the host dm queue (one writer at a
// time on the host). A journal that cannot be written never stops dm work: one warning per process.
import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, statSync, writeSync } from "node:fs";
import { join } from "node:path";
import { log } from "./log.ts";

export const JOURNAL_FILE = "commands.log";
export const JOURNAL_MAX_BYTES = 4 * 1024 * 1024;
export const JOURNAL_KEEP = 3;

let dir: string | null = null;
let warned = false;
/** The directory made by this process already (one mkdir per process, not per record). */
let made: string | null = null;

/** Journal the commands of this process into `stateDir` (null: no journal). */
export function useCommandJournal(stateDir: string | null): void {
  dir = stateDir;
  made = null;
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

/** Append one record; with sync, fsync it before returning. */
export function journal(rec: object, o: { sync: boolean; maxBytes?: number } = { sync: true }): void {
  if (dir === null) return;
  const path = journalPath(dir);
  try {
    if (made !== dir) {
      mkdirSync(dir, { recursive: true });
      made = dir;
    }
    let size = 0;
    try {
      size = statSync(path).size;
    } catch {}
    if (size >= (o.maxBytes ?? JOURNAL_MAX_BYTES)) rotate(path);
    const fd = openSync(path, "a", 0o644);
    try {
      writeSync(fd, `${JSON.stringify(rec)}\n`);
      if (o.sync) fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch (e) {
    if (warned) return;
    warned = true;
    log.warn(`cannot write the command journal ${path}: ${(e as Error).message} (dm work goes on; records stay on stderr)`);
  }
}
