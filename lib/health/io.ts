// Everything the host checks read, behind one interface so unit tests feed /proc fixtures.
// Most reads are async (thread pool): a read that hangs on a wedged kernel cannot stop the per-check
// timeout from firing. Two are synchronous (docs/ops-health.md#timeouts): /proc/<pid>/stat (cheap,
// takes no mm lock) and /dev/kmsg, read O_NONBLOCK record by record (returns at the end, never waits).
import { closeSync, constants, openSync, readdirSync, readFileSync, readSync } from "node:fs";
import { readdir, readFile, readlink } from "node:fs/promises";

export interface HealthIo {
  /** Text of a /proc or /sys file; rejects when it does not exist. */
  readText(path: string): Promise<string>;
  /** /proc/<pid>/stat of every process (or of the given pids); vanished processes are skipped. */
  procStats(pids?: string[]): Promise<string[]>;
  /** Entries of a directory (e.g. /proc/<pid>/fd); rejects when unreadable. */
  listDir(path: string): Promise<string[]>;
  readLink(path: string): Promise<string>;
  /** All records currently in the kernel ring buffer (raw /dev/kmsg records). */
  readKmsg(): Promise<string[]>;
  sleep(ms: number): Promise<void>;
}

const KMSG_RECORD_MAX = 8192;

function readKmsgSync(): string[] {
  const fd = openSync("/dev/kmsg", constants.O_RDONLY | constants.O_NONBLOCK);
  const buf = Buffer.alloc(KMSG_RECORD_MAX);
  const out: string[] = [];
  try {
    for (let i = 0; i < 1_000_000; i++) {
      let n: number;
      try {
        n = readSync(fd, buf, 0, buf.length, null);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === "EAGAIN") break; // caught up
        if (code === "EPIPE") continue; // records overwritten while reading: skip ahead
        throw e;
      }
      if (n <= 0) break;
      out.push(buf.toString("utf8", 0, n));
    }
  } finally {
    closeSync(fd);
  }
  return out;
}

export const procIo: HealthIo = {
  readText: (path) => readFile(path, "utf8"),
  // Synchronous on purpose: 3-4x cheaper than a thread-pool read per process, and /proc/<pid>/stat
  // (unlike cmdline/environ) does not take the task's mm lock, so it does not hang on a stuck task.
  procStats: async (pids) => {
    const list = pids ?? readdirSync("/proc").filter((p) => p.charCodeAt(0) >= 48 && p.charCodeAt(0) <= 57);
    const out: string[] = [];
    for (const p of list) {
      try {
        out.push(readFileSync(`/proc/${p}/stat`, "latin1"));
      } catch {
        // exited meanwhile
      }
    }
    return out;
  },
  listDir: (path) => readdir(path),
  readLink: (path) => readlink(path),
  readKmsg: async () => readKmsgSync(),
  sleep: (ms) => Bun.sleep(ms),
};
