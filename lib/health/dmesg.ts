// New kernel log lines about device-mapper, thin pools, needs_check and I/O errors on dm devices.
// "New" means after the cursor (boot id + sequence number) remembered in the state dir from the
// previous check, so an old error is reported once, not forever. Without a cursor (first run, or no
// state dir) the last `lookbackMs` of the log counts.
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { errorMessage } from "../errors.ts";
import type { HealthIo } from "./io.ts";
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
  { re: /device-mapper: thin: .*(Creation of new (thinly-provisioned device|snapshot)|Deletion of thin device).* failed/i, status: "warn", what: "pool message refused" },
  { re: /device-mapper: thin: .*switching pool to write mode/i, status: "warn", what: "pool left a degraded mode" },
  { re: /device-mapper: thin: .*switching pool to (read-only|fail|out-of-data-space)/i, status: "block", what: "pool changed mode" },
  { re: /device-mapper: thin: .*(metadata operation .* failed|aborting current metadata transaction|commit failed)/i, status: "block", what: "thin metadata failure" },
  { re: /needs_check|needs check/i, status: "block", what: "needs_check" },
  { re: /device-mapper: thin: .*(no free (metadata|data) space|unable to)/i, status: "block", what: "thin pool failure" },
  { re: /device-mapper: (space map|block manager|btree|transaction manager|persistent data|array|bio prison)/i, status: "block", what: "persistent-data error" },
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

export async function checkDmesg(io: HealthIo, o: { stateDir?: string | undefined; lookbackMs: number }): Promise<CheckResult> {
  let raw: string[];
  try {
    raw = await io.readKmsg();
  } catch (e) {
    return result("host.dmesg", "warn", `cannot read the kernel log: ${errorMessage(e)}`, RUNBOOK.dmesgUnreadable);
  }
  const [bootId, uptime, cursor] = await Promise.all([
    io.readText("/proc/sys/kernel/random/boot_id").then((s) => s.trim(), () => "unknown"),
    io.readText("/proc/uptime").then((s) => Math.round(Number(s.split(/\s+/)[0]) * 1e6), () => 0),
    readCursor(o.stateDir),
  ]);
  const records = raw.map(parseKmsgRecord).filter((r): r is KmsgRecord => r !== null);
  const { findings, lastSeq, lost } = findNew(records, { cursor, bootId, uptimeUsec: uptime, lookbackMs: o.lookbackMs });
  let cursorNote = "";
  if (o.stateDir) {
    try {
      await writeCursor(o.stateDir, { boot_id: bootId, seq: lastSeq });
    } catch (e) {
      cursorNote = ` (cursor not saved: ${errorMessage(e)})`;
    }
  } else cursorNote = " (no state dir: looked back " + Math.round(o.lookbackMs / 1000) + " s)";
  const scope = cursor && cursor.boot_id === bootId ? "since the last check" : `in the last ${Math.round(o.lookbackMs / 60000)} min`;
  if (findings.length === 0) {
    return result("host.dmesg", "ok", `no new device-mapper/I/O errors in the kernel log ${scope}${cursorNote}`, "", { cursor_seq: lastSeq });
  }
  const blocking = findings.filter((f) => f.status === "block");
  const worst = blocking[0] ?? findings[0]!;
  const lines = await Promise.all(findings.slice(0, 10).map((f) => nameDmDevices(io, f.line)));
  const first = await nameDmDevices(io, worst.line);
  return result(
    "host.dmesg",
    blocking.length ? "block" : "warn",
    `${findings.length} new kernel message(s) ${scope} (${worst.what}): "${first}"${findings.length > 1 ? ` (+${findings.length - 1} more)` : ""}${lost ? " — some messages were lost from the ring buffer" : ""}${cursorNote}`,
    RUNBOOK.dmesg,
    { lines, cursor_seq: lastSeq, lost },
  );
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
 * blocked by GC's own cleanup. Returns the lines, for GC's report. Anything else stays reported.
 */
export async function acknowledgeOwnMessages(io: HealthIo, stateDir: string, devices: ReadonlySet<string>): Promise<string[]> {
  if (devices.size === 0) return [];
  const [raw, bootId, cursor] = await Promise.all([
    io.readKmsg(),
    io.readText("/proc/sys/kernel/random/boot_id").then((s) => s.trim(), () => "unknown"),
    readCursor(stateDir),
  ]);
  const records = raw.map(parseKmsgRecord).filter((r): r is KmsgRecord => r !== null);
  const r = ownMessagesPrefix(records, { cursor, bootId, devices });
  if (!r || r.acknowledged.length === 0) return [];
  // another check may have moved the cursor meanwhile: never move it back
  const now = await readCursor(stateDir);
  if (now && now.boot_id === bootId && now.seq >= r.seq) return [];
  await writeCursor(stateDir, { boot_id: bootId, seq: r.seq });
  return r.acknowledged.map((f) => f.line);
}
