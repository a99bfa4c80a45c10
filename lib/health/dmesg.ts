// Kernel log lines about device-mapper, thin pools, needs_check and I/O errors on dm devices.
// "New" means after the cursor (boot id + sequence number) remembered in the state dir from the
// previous check, so each line is read once; without a cursor (first run, new boot, no state dir) the
// last `lookbackMs` of the log counts. A blocking line is then kept (kernel-findings.ts): it blocks
// every check until it is older than the window or acknowledged. Warnings are reported once.
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { errorMessage } from "../errors.ts";
import type { HealthIo } from "./io.ts";
import {
  DEFAULT_KERNEL_ERROR_WINDOW_MS,
  findingKey,
  judgeFindings,
  mergeFindings,
  readFindings,
  type StoredFinding,
  withKmsgLock,
  writeFindings,
} from "./kernel-findings.ts";
import { RUNBOOK } from "./runbook.ts";
import { type CheckResult, type CheckStatus, result } from "./types.ts";

export interface KmsgRecord {
  facility: number;
  level: number;
  seq: number;
  tsUsec: number;
  message: string;
}

/** "prio,seq,ts_usec,flags[,…];message\n KEY=val…" (Documentation/ABI/testing/dev-kmsg). */
export function parseKmsgRecord(raw: string): KmsgRecord | null {
  const semi = raw.indexOf(";");
  if (semi < 0) return null;
  const [prio, seq, ts] = raw.slice(0, semi).split(",");
  if (!prio || !seq || !ts || !/^\d+$/.test(prio) || !/^\d+$/.test(seq) || !/^\d+$/.test(ts)) return null;
  const text = raw.slice(semi + 1).split("\n")[0] ?? "";
  const message = text.replace(/\\x([0-9a-f]{2})/gi, (_, h: string) => String.fromCharCode(Number.parseInt(h, 16)));
  const p = Number(prio);
  return { facility: p >> 3, level: p & 7, seq: Number(seq), tsUsec: Number(ts), message };
}

// Ordered: first match wins.
const RULES: { re: RegExp; status: Exclude<CheckStatus, "ok"> | "ignore"; what: string }[] = [
  // table-load/ioctl complaints come from a rejected userspace command, not from a sick pool
  { re: /device-mapper: (ioctl|table|uevent):/i, status: "ignore", what: "" },
  // a refused pool message (create on an existing id, delete of a missing/busy one): the caller
  // already got the error; it says nothing about the pool's health
  {
    re: /device-mapper: thin: .*(Creation of new (thinly-provisioned device|snapshot)|Deletion of thin device).* failed/i,
    status: "warn",
    what: "pool message refused",
  },
  { re: /device-mapper: thin: .*switching pool to write mode/i, status: "warn", what: "pool left a degraded mode" },
  { re: /device-mapper: thin: .*switching pool to (read-only|fail|out-of-data-space|out-of-metadata-space)/i, status: "block", what: "pool changed mode" },
  { re: /device-mapper: thin: .*no free metadata blocks/i, status: "block", what: "thin pool out of metadata space" },
  {
    re: /device-mapper: thin: .*(metadata operation .* failed|aborting current metadata transaction|commit failed)/i,
    status: "block",
    what: "thin metadata failure",
  },
  { re: /needs_check|needs check/i, status: "block", what: "needs_check" },
  { re: /device-mapper: thin: .*(no free (metadata|data) space|unable to)/i, status: "block", what: "thin pool failure" },
  {
    re: /device-mapper: (space map|block manager|btree|transaction manager|persistent data|array|bio prison)/i,
    status: "block",
    what: "persistent-data error",
  },
  { re: /device-mapper: thin: .*reached low water mark/i, status: "warn", what: "pool reached its low water mark" },
  { re: /\bI\/O error\b.*\bdm-\d+|\bdm-\d+\b.*\bI\/O error\b/i, status: "block", what: "I/O error on a dm device" },
  { re: /(EXT4-fs|XFS|Buffer I\/O).*(error|corrupt).*\bdm-\d+|EXT4-fs error \(device dm-\d+\)/i, status: "block", what: "filesystem error on a dm device" },
  { re: /blocked for more than \d+ seconds/i, status: "block", what: "hung task" },
  { re: /\bI\/O error\b.*\bloop\d+/i, status: "warn", what: "I/O error on a loop device" },
  { re: /device-mapper: .*(error|fail|corrupt|checksum|mismatch)/i, status: "block", what: "device-mapper error" },
];

export function classifyKernelLine(message: string): { status: Exclude<CheckStatus, "ok">; what: string } | null {
  for (const r of RULES) {
    if (r.re.test(message)) return r.status === "ignore" ? null : { status: r.status, what: r.what };
  }
  return null;
}

export interface KmsgCursor {
  boot_id: string;
  seq: number;
}

const CURSOR_FILE = "health-kmsg.json";

async function readCursor(stateDir: string | undefined): Promise<KmsgCursor | null> {
  if (!stateDir) return null;
  try {
    const c = JSON.parse(await readFile(join(stateDir, CURSOR_FILE), "utf8")) as Partial<KmsgCursor>;
    return typeof c.boot_id === "string" && typeof c.seq === "number" ? { boot_id: c.boot_id, seq: c.seq } : null;
  } catch {
    return null;
  }
}

async function writeCursor(stateDir: string, c: KmsgCursor): Promise<void> {
  await mkdir(stateDir, { recursive: true });
  const tmp = join(stateDir, `${CURSOR_FILE}.${process.pid}.tmp`);
  await writeFile(tmp, `${JSON.stringify(c)}\n`);
  await rename(tmp, join(stateDir, CURSOR_FILE));
}

export interface DmesgFinding {
  seq: number;
  status: Exclude<CheckStatus, "ok">;
  what: string;
  line: string;
}

/** The relevant kernel-facility records after the cursor (or within the lookback). Pure. */
export function findNew(
  records: KmsgRecord[],
  o: { cursor: KmsgCursor | null; bootId: string; uptimeUsec: number; lookbackMs: number },
): { findings: DmesgFinding[]; lastSeq: number; lost: boolean } {
  const sameBoot = o.cursor !== null && o.cursor.boot_id === o.bootId;
  const after = sameBoot ? o.cursor!.seq : -1;
  const since = sameBoot ? 0 : o.uptimeUsec - o.lookbackMs * 1000;
  let lastSeq = sameBoot ? o.cursor!.seq : -1;
  const findings: DmesgFinding[] = [];
  const firstSeq = records[0]?.seq;
  for (const r of records) {
    lastSeq = Math.max(lastSeq, r.seq);
    if (r.seq <= after || r.tsUsec < since) continue;
    if (r.facility !== 0) continue; // kernel messages only: userspace can write to /dev/kmsg
    const c = classifyKernelLine(r.message);
    if (c) findings.push({ seq: r.seq, status: c.status, what: c.what, line: r.message });
  }
  return { findings, lastSeq, lost: sameBoot && firstSeq !== undefined && firstSeq > after + 1 };
}

/** "dm-3" → "dm-3 (mypool-t1)", "thin: 254:0:" → "thin: 254:0 (mypool):" using sysfs, best effort. */
async function nameDmDevices(io: HealthIo, line: string): Promise<string> {
  let out = line;
  for (const d of new Set(line.match(/\bdm-\d+\b/g) ?? [])) {
    const name = (await io.readText(`/sys/block/${d}/dm/name`).catch(() => "")).trim();
    if (name) out = out.replace(new RegExp(`\\b${d}\\b`, "g"), `${d} (${name})`);
  }
  const mm = /^device-mapper: [\w -]+: (\d+:\d+):/.exec(line)?.[1];
  if (mm) {
    const name = (await io.readText(`/sys/dev/block/${mm}/dm/name`).catch(() => "")).trim();
    if (name) out = out.replace(`${mm}:`, `${mm} (${name}):`);
  }
  return out;
}

export interface DmesgOptions {
  stateDir?: string | undefined;
  /** Without a cursor (first run, new boot, no state dir), how far back lines count. */
  lookbackMs: number;
  /** A blocking finding blocks until it is this old or acknowledged (default 15 min). */
  windowMs?: number | undefined;
  now?: number | undefined;
}

function fmtAge(s: number): string {
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

/** This boot's id and uptime in µs, "unknown" and 0 when unreadable. */
async function bootAndUptime(io: HealthIo): Promise<[string, number]> {
  return await Promise.all([
    io.readText("/proc/sys/kernel/random/boot_id").then(
      (s) => s.trim(),
      () => "unknown",
    ),
    io.readText("/proc/uptime").then(
      (s) => Math.round(Number(s.split(/\s+/)[0]) * 1e6),
      () => 0,
    ),
  ]);
}

interface KmsgScanEnv {
  io: HealthIo;
  records: KmsgRecord[];
  bootId: string;
  uptime: number;
  now: number;
  lookbackMs: number;
}

/** The records after `cursor`: their findings, the blocking ones as fresh stored findings, merged into `stored`. */
async function scanKmsg(e: KmsgScanEnv, cursor: KmsgCursor | null, stored: StoredFinding[]) {
  const { io, records, bootId, uptime, now } = e;
  const found = findNew(records, { cursor, bootId, uptimeUsec: uptime, lookbackMs: e.lookbackMs });
  const fresh: StoredFinding[] = [];
  for (const f of found.findings.filter((x) => x.status === "block")) {
    const tsUsec = records.find((r) => r.seq === f.seq)?.tsUsec ?? uptime;
    const loggedAt = uptime > 0 ? now - Math.max(0, Math.round((uptime - tsUsec) / 1000)) : now;
    fresh.push({
      boot_id: bootId,
      seq: f.seq,
      what: f.what,
      line: await nameDmDevices(io, f.line),
      logged_at: loggedAt,
      first_seen_at: now,
      acknowledged: null,
    });
  }
  return {
    ...found,
    fresh,
    merged: mergeFindings(stored, fresh, now),
    scope: cursor && cursor.boot_id === bootId ? "since the last check" : `in the last ${Math.round(e.lookbackMs / 60000)} min`,
  };
}

type KmsgScan = Awaited<ReturnType<typeof scanKmsg>>;

/** Judge the scan's findings into the host.dmesg result. */
async function dmesgResult(io: HealthIo, s: KmsgScan, o: { now: number; windowMs: number; bootId: string; cursorNote: string }): Promise<CheckResult> {
  const { now, windowMs, bootId, cursorNote } = o;
  const freshKeys = new Set(s.fresh.map(findingKey));
  const judged = judgeFindings(s.merged, { now, windowMs, freshKeys });
  const blocking = judged.filter((f) => f.blocks);
  const warns = s.findings.filter((f) => f.status === "warn");
  const details = {
    findings: judged.map((f) => ({
      boot_id: f.boot_id,
      seq: f.seq,
      what: f.what,
      line: f.line,
      age_s: f.age_s,
      new: f.new,
      acknowledged: f.acknowledged !== null,
      acknowledged_by: f.acknowledged?.by ?? null,
      acknowledged_at: f.acknowledged ? new Date(f.acknowledged.at).toISOString() : null,
    })),
    warnings: await Promise.all(warns.slice(0, 10).map((f) => nameDmDevices(io, f.line))),
    window_s: Math.round(windowMs / 1000),
    boot_id: bootId,
    cursor_seq: s.lastSeq,
    lost: s.lost,
  };
  const lostNote = s.lost ? " — some messages were lost from the ring buffer" : "";
  const acked = judged.length - blocking.length;
  const ackNote = acked ? ` (${acked} acknowledged kernel error(s) in the last ${fmtAge(details.window_s)} not counted)` : "";
  if (blocking.length) {
    const worst = blocking.at(-1)!;
    const more = blocking.length > 1 ? ` (+${blocking.length - 1} more)` : "";
    return result(
      "host.dmesg",
      "block",
      `${blocking.length} kernel error(s) not acknowledged, newest ${fmtAge(worst.age_s)} ago${worst.new ? ", new" : ""} (${worst.what}): "${worst.line}"${more}; blocks until acknowledged or ${fmtAge(details.window_s)} old${lostNote}${cursorNote}`,
      RUNBOOK.dmesg,
      details,
    );
  }
  if (warns.length) {
    const first = details.warnings[0]!;
    return result(
      "host.dmesg",
      "warn",
      `${warns.length} new kernel message(s) ${s.scope} (${warns[0]!.what}): "${first}"${warns.length > 1 ? ` (+${warns.length - 1} more)` : ""}${lostNote}${ackNote}${cursorNote}`,
      RUNBOOK.dmesg,
      details,
    );
  }
  return result("host.dmesg", "ok", `no unacknowledged device-mapper/I/O errors in the kernel log${ackNote}${cursorNote}`, "", details);
}

/** What the kernel logged since the cursor; blocking lines are kept (kernel-findings.ts) and judged. */
export async function checkDmesg(io: HealthIo, o: DmesgOptions): Promise<CheckResult> {
  let raw: string[];
  try {
    raw = await io.readKmsg();
  } catch (e) {
    return result("host.dmesg", "warn", `cannot read the kernel log: ${errorMessage(e)}`, RUNBOOK.dmesgUnreadable);
  }
  const now = o.now ?? Date.now();
  const windowMs = o.windowMs ?? DEFAULT_KERNEL_ERROR_WINDOW_MS;
  const [bootId, uptime] = await bootAndUptime(io);
  const records = raw.map(parseKmsgRecord).filter((r): r is KmsgRecord => r !== null);
  const env: KmsgScanEnv = { io, records, bootId, uptime, now, lookbackMs: o.lookbackMs };
  let s: KmsgScan;
  let cursorNote = "";
  if (o.stateDir) {
    const dir = o.stateDir;
    s = await withKmsgLock(dir, async () => {
      const cursor = await readCursor(dir);
      const r = await scanKmsg(env, cursor, await readFindings(dir));
      if (r.fresh.length) await writeFindings(dir, r.merged);
      // unchanged (same boot, nothing new): no rewrite — three file operations off every pre-flight
      if (cursor?.boot_id !== bootId || cursor.seq !== r.lastSeq) await writeCursor(dir, { boot_id: bootId, seq: r.lastSeq });
      return r;
    });
  } else {
    s = await scanKmsg(env, null, []);
    cursorNote = ` (no state dir: looked back ${Math.round(o.lookbackMs / 1000)} s; findings are not kept)`;
  }
  return await dmesgResult(io, s, { now, windowMs, bootId, cursorNote });
}

/** The cursor a check left (its report's host.dmesg details), for acknowledgeOwnMessages. */
export function cursorOf(c: CheckResult | undefined): KmsgCursor | null {
  const d = c?.details;
  return d && typeof d.boot_id === "string" && typeof d.cursor_seq === "number" ? { boot_id: d.boot_id, seq: d.cursor_seq } : null;
}

// What GC's own unmount of a failed layer's filesystem makes the kernel say: ext4 errors (e.g.
// "Couldn't clean up the journal") and buffer I/O errors on that one device.
const OWN_UNMOUNT_KINDS = new Set(["filesystem error on a dm device", "I/O error on a dm device"]);

/**
 * The cursor may move past messages caused by unmounting devices that were then removed (`devices`:
 * kernel names, `dm-N`), and past irrelevant records, up to the first relevant message that is not
 * one of those: that one and all after it stay for the next check to report. Same boot only. Pure.
 */
export function ownMessagesPrefix(
  records: KmsgRecord[],
  o: { cursor: KmsgCursor | null; bootId: string; devices: ReadonlySet<string> },
): { acknowledged: DmesgFinding[]; seq: number } | null {
  if (!o.cursor || o.cursor.boot_id !== o.bootId || o.devices.size === 0) return null;
  let seq = o.cursor.seq;
  const acknowledged: DmesgFinding[] = [];
  for (const r of records) {
    if (r.seq <= o.cursor.seq) continue;
    const c = r.facility === 0 ? classifyKernelLine(r.message) : null;
    if (c) {
      const named = r.message.match(/\bdm-\d+\b/g) ?? [];
      const ours = OWN_UNMOUNT_KINDS.has(c.what) && named.length > 0 && named.every((d) => o.devices.has(d));
      if (!ours) break;
      acknowledged.push({ seq: r.seq, status: c.status, what: c.what, line: r.message });
    }
    seq = r.seq;
  }
  return { acknowledged, seq };
}

/**
 * After GC removed devices it had unmounted: take the kernel's complaints about those unmounts off
 * the health check's plate (they name devices that no longer exist), so the next dm work is not
 * blocked by GC's own cleanup. `since`: the cursor GC's own health check left before it acted (a
 * check run meanwhile may have moved the cursor past those lines and kept them: they are then
 * marked acknowledged by gc). Returns the lines, for GC's report. Anything else stays reported.
 */
export async function acknowledgeOwnMessages(io: HealthIo, stateDir: string, devices: ReadonlySet<string>, since: KmsgCursor | null = null): Promise<string[]> {
  if (devices.size === 0) return [];
  const [raw, bootId] = await Promise.all([
    io.readKmsg(),
    io.readText("/proc/sys/kernel/random/boot_id").then(
      (s) => s.trim(),
      () => "unknown",
    ),
  ]);
  const records = raw.map(parseKmsgRecord).filter((r): r is KmsgRecord => r !== null);
  return withKmsgLock(stateDir, async () => {
    const cursor = await readCursor(stateDir);
    const from = since && cursor && since.boot_id === cursor.boot_id && since.seq < cursor.seq ? since : cursor;
    const r = ownMessagesPrefix(records, { cursor: from, bootId, devices });
    if (!r || r.acknowledged.length === 0) return [];
    const ours = new Set(r.acknowledged.map((f) => findingKey({ boot_id: bootId, seq: f.seq })));
    const stored = await readFindings(stateDir);
    const kept = stored.filter((f) => ours.has(findingKey(f)) && f.acknowledged === null);
    for (const f of kept) f.acknowledged = { by: "thinimg gc (its own unmount of a device it then removed)", at: Date.now() };
    if (kept.length) await writeFindings(stateDir, stored);
    // never move the cursor back
    if (cursor && cursor.boot_id === bootId && cursor.seq >= r.seq && kept.length === 0) return [];
    if (!cursor || cursor.boot_id !== bootId || cursor.seq < r.seq) await writeCursor(stateDir, { boot_id: bootId, seq: r.seq });
    return r.acknowledged.map((f) => f.line);
  });
}
