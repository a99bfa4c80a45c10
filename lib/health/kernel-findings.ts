// Sticky kernel-log findings. The cursor (health-kmsg.json) makes each kernel line *new* once; a
// blocking line is then kept in <state dir>/health-findings.json and blocks every later check — the
// GC timer's, an operator's, another process's — until it is older than the window or an operator
// acknowledged it (`bun scripts/health.ts --ack`, appended to health-ack.log with who and when).
// Every read-modify-write of the cursor and the findings happens under one flock, so two checks
// running at once never lose a finding or an acknowledgement.
import { appendFile, mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { userInfo } from "node:os";
import { join } from "node:path";
import { ThinimgError } from "../errors.ts";
import { acquireFlock } from "../util/flock.ts";

export const FINDINGS_FILE = "health-findings.json";
export const ACK_LOG_FILE = "health-ack.log";
const LOCK_FILE = "health-kmsg.lock";
/** The section is a few small file reads and writes; a holder past this is stuck. */
const LOCK_WAIT_MS = 5_000;
/** Findings are kept this long whatever the window (a caller may use a longer window), at most MAX. */
const RETAIN_MS = 24 * 3_600_000;
const MAX_KEPT = 200;

export { DEFAULT_KERNEL_ERROR_WINDOW_MS } from "../config.ts";

export interface Acknowledgement {
  by: string;
  /** unix ms */
  at: number;
}

export interface StoredFinding {
  boot_id: string;
  seq: number;
  what: string;
  /** The kernel's line, dm devices named as they were when it was first seen. */
  line: string;
  /** Wall-clock time the kernel logged it (unix ms), from its timestamp and the uptime. */
  logged_at: number;
  first_seen_at: number;
  acknowledged: Acknowledgement | null;
}

const keyOf = (f: { boot_id: string; seq: number }) => `${f.boot_id}:${f.seq}`;

/** Stored ∪ fresh (the stored copy wins: it may carry an acknowledgement), old ones dropped. Pure. */
export function mergeFindings(stored: StoredFinding[], fresh: StoredFinding[], now: number): StoredFinding[] {
  const byKey = new Map<string, StoredFinding>();
  for (const f of [...stored, ...fresh]) if (!byKey.has(keyOf(f))) byKey.set(keyOf(f), f);
  return [...byKey.values()]
    .filter((f) => now - f.logged_at < RETAIN_MS)
    .sort((a, b) => a.logged_at - b.logged_at || a.seq - b.seq)
    .slice(-MAX_KEPT);
}

export interface JudgedFinding extends StoredFinding {
  age_s: number;
  /** First seen by this check. */
  new: boolean;
  blocks: boolean;
}

/**
 * Which findings matter now. One blocks while it is not acknowledged and younger than the window —
 * and always in the check that first sees it, however old (nobody has seen it yet). Acknowledged
 * findings inside the window are listed, not blocking; older ones are history. Pure.
 */
export function judgeFindings(stored: StoredFinding[], o: { now: number; windowMs: number; freshKeys: ReadonlySet<string> }): JudgedFinding[] {
  const out: JudgedFinding[] = [];
  for (const f of stored) {
    const age = Math.max(0, o.now - f.logged_at);
    const isNew = o.freshKeys.has(keyOf(f));
    if (age >= o.windowMs && !isNew) continue;
    out.push({ ...f, age_s: Math.round(age / 1000), new: isNew, blocks: f.acknowledged === null });
  }
  return out;
}

export function findingKey(f: { boot_id: string; seq: number }): string {
  return keyOf(f);
}

export async function readFindings(stateDir: string): Promise<StoredFinding[]> {
  try {
    const j = JSON.parse(await readFile(join(stateDir, FINDINGS_FILE), "utf8")) as { findings?: unknown };
    return Array.isArray(j.findings) ? (j.findings as StoredFinding[]).filter((f) => typeof f?.boot_id === "string" && typeof f.seq === "number") : [];
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    // a damaged file must not silently unblock: say so (the check blocks with this message)
    throw new ThinimgError("input", `cannot read ${join(stateDir, FINDINGS_FILE)}: ${(e as Error).message}`, {
      hint: `look at the file; remove it only after reading the kernel log (dmesg -T)`,
    });
  }
}

export async function writeFindings(stateDir: string, findings: StoredFinding[]): Promise<void> {
  const tmp = join(stateDir, `${FINDINGS_FILE}.${process.pid}.tmp`);
  await writeFile(tmp, `${JSON.stringify({ findings }, null, 1)}\n`);
  await rename(tmp, join(stateDir, FINDINGS_FILE));
}

/** Run fn holding the state dir's kernel-log lock (creates the dir). */
export async function withKmsgLock<T>(stateDir: string, fn: () => Promise<T>): Promise<T> {
  await mkdir(stateDir, { recursive: true });
  const lock = await acquireFlock(join(stateDir, LOCK_FILE), LOCK_WAIT_MS);
  if (!lock) {
    throw new ThinimgError("conflict", `another thinimg process has held ${join(stateDir, LOCK_FILE)} for ${LOCK_WAIT_MS / 1000} s`, {
      hint: "find it with `fuser -v` on that file; it is normally held for milliseconds",
    });
  }
  try {
    return await fn();
  } finally {
    lock.release();
  }
}

/** Who is acknowledging: the login behind sudo if any, the user, the uid. */
export function whoAmI(env: Record<string, string | undefined> = process.env): string {
  let user = "";
  try {
    user = userInfo().username;
  } catch {
    user = `uid ${process.getuid?.() ?? "?"}`;
  }
  return env.SUDO_USER && env.SUDO_USER !== user ? `${env.SUDO_USER} (via sudo as ${user})` : user;
}

/**
 * Acknowledge every finding a check has recorded and nobody acknowledged yet; log who and when to
 * health-ack.log. Lines no check has seen yet are not covered: the next check shows them.
 */
export async function acknowledgeFindings(stateDir: string, o: { by: string; now?: number }): Promise<StoredFinding[]> {
  const now = o.now ?? Date.now();
  return withKmsgLock(stateDir, async () => {
    const stored = await readFindings(stateDir);
    const acked = stored.filter((f) => f.acknowledged === null);
    if (acked.length === 0) return [];
    for (const f of acked) f.acknowledged = { by: o.by, at: now };
    const record = {
      at: new Date(now).toISOString(),
      by: o.by,
      pid: process.pid,
      findings: acked.map((f) => ({ boot_id: f.boot_id, seq: f.seq, what: f.what, line: f.line, logged_at: new Date(f.logged_at).toISOString() })),
    };
    await appendFile(join(stateDir, ACK_LOG_FILE), `${JSON.stringify(record)}\n`, { mode: 0o600 });
    await writeFindings(stateDir, stored);
    return acked;
  });
}
