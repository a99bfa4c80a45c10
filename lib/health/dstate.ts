// Processes in uninterruptible sleep (D) on device-mapper I/O: the first sign of a wedged pool.
// A process counts when it is in D in two scans a short window apart (a single busy I/O is not a
// hang) and is tied to dm by its name (dm kernel threads, jbd2/dm-*, dm kworkers, loop, dm tools)
// or by where it sleeps (wchan / kernel stack in dm code).
import type { HealthIo } from "./io.ts";
import { RUNBOOK } from "./runbook.ts";
import { type CheckResult, result } from "./types.ts";

export interface ProcStat {
  pid: number;
  comm: string;
  state: string;
  starttime: number;
}

/** One /proc/<pid>/stat line; comm may contain spaces and parentheses. */
export function parseProcStat(text: string): ProcStat | null {
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) return null;
  const rest = text.slice(close + 2).split(" ");
  return { pid: Number(text.slice(0, open).trim()), comm: text.slice(open + 1, close), state: rest[0] ?? "?", starttime: Number(rest[19] ?? 0) };
}

const DM_COMM = [
  /^kdmflush/,
  /^kcopyd/,
  /^kdmremove/,
  /^dm[-_]/, // dm-thin, dm_bufio_cache, dm-io, dm_…
  /^jbd2\/dm-/,
  /^ext4-rsv-conver/,
  /^flush-25[0-9]/, // old per-bdi flushers (flush-253:0)
  /^loop\d+$/,
  /^kworker\/.*[+-](dm|kdmflush|kcopyd|dm-thin|dm_bufio|loop\d+)/,
  /^(dmsetup|thin_check|thin_repair|thin_dump|thin_ls|thin_restore|losetup)$/,
];
const DM_KERNEL_CODE = /\b(dm_|__dm_|thin_|pool_|dm_bufio|dm_pool|dm_thin|kcopyd|bio_prison|sm_|dm_bm_|loop_)/;

export function tiedToDm(comm: string, wchan: string, stack: string): string | null {
  if (DM_COMM.some((re) => re.test(comm))) return `name ${comm}`;
  if (DM_KERNEL_CODE.test(wchan)) return `sleeping in ${wchan}`;
  const frame = stack.split("\n").find((l) => DM_KERNEL_CODE.test(l));
  if (frame)
    return `stack ${frame
      .replace(/^\[<[0-9a-f]+>\]\s*/, "")
      .replace(/\+0x.*$/, "")
      .trim()}`;
  return null;
}

/** pid:starttime → stat of every process in D state now (of all, or of the given pids). */
export async function scanDState(io: HealthIo, pids?: string[]): Promise<Map<string, ProcStat>> {
  const out = new Map<string, ProcStat>();
  for (const text of await io.procStats(pids)) {
    const s = parseProcStat(text);
    if (s && s.state === "D") out.set(`${s.pid}:${s.starttime}`, s);
  }
  return out;
}

export interface StuckProcess {
  pid: number;
  comm: string;
  wchan: string;
  why: string;
}

/** Block major of device-mapper from /proc/devices (253 on most hosts, 254 in UML). */
export function dmMajor(procDevices: string): number | null {
  const m = /^\s*(\d+)\s+device-mapper$/m.exec(procDevices);
  return m ? Number(m[1]) : null;
}

/** Mount points whose source is a dm device (from /proc/self/mountinfo). */
export function dmMountPoints(mountinfo: string, major: number): string[] {
  const out: string[] = [];
  for (const line of mountinfo.split("\n")) {
    const f = line.split(" ");
    if (f[2]?.startsWith(`${major}:`) && f[4]) out.push(f[4].replace(/\\040/g, " "));
  }
  return out;
}

const FD_LIMIT = 512;

/** A generic I/O sleeper (dd, a VMM) is tied to dm by what it has open: a dm device or a file on one. */
async function openDmFile(io: HealthIo, pid: number, mounts: string[]): Promise<string | null> {
  const fds = await io.listDir(`/proc/${pid}/fd`).catch(() => [] as string[]);
  for (const fd of fds.slice(0, FD_LIMIT)) {
    const target = await io.readLink(`/proc/${pid}/fd/${fd}`).catch(() => "");
    if (/^\/dev\/(dm-\d+|mapper\/)/.test(target)) return `has ${target} open`;
    const mp = mounts.find((m) => m !== "/" && (target === m || target.startsWith(`${m}/`)));
    if (mp) return `has ${target} open (on a dm device mounted at ${mp})`;
  }
  return null;
}

/** Processes in D in both scans and tied to dm. */
export async function stuckOnDm(io: HealthIo, first: Map<string, ProcStat>, second: Map<string, ProcStat>): Promise<StuckProcess[]> {
  const both = [...second.entries()].filter(([k]) => first.has(k)).map(([, s]) => s);
  if (both.length === 0) return [];
  const major = dmMajor(await io.readText("/proc/devices").catch(() => ""));
  const mounts = major === null ? [] : dmMountPoints(await io.readText("/proc/self/mountinfo").catch(() => ""), major);
  const out = await Promise.all(
    both.map(async (s) => {
      const wchan = (await io.readText(`/proc/${s.pid}/wchan`).catch(() => "")).trim();
      // cheapest evidence first; the stack needs root and may be absent
      const why =
        tiedToDm(s.comm, wchan, "") ??
        tiedToDm(s.comm, wchan, await io.readText(`/proc/${s.pid}/stack`).catch(() => "")) ??
        (await openDmFile(io, s.pid, mounts));
      return why ? { pid: s.pid, comm: s.comm, wchan, why } : null;
    }),
  );
  return out.filter((x): x is StuckProcess => x !== null);
}

export function judgeDState(stuck: StuckProcess[], windowMs: number, otherD: number): CheckResult {
  if (stuck.length === 0) {
    return result("host.dstate", "ok", `no process stuck in D state on dm I/O (${otherD} other D-state process(es))`, "", { other_d: otherD });
  }
  const list = stuck
    .slice(0, 5)
    .map((p) => `${p.pid} ${p.comm} (${p.why}${p.wchan && p.wchan !== "0" && !p.why.includes(p.wchan) ? `, wchan ${p.wchan}` : ""})`)
    .join(", ");
  return result(
    "host.dstate",
    "block",
    `${stuck.length} process(es) in D state on device-mapper I/O for ≥ ${windowMs} ms: ${list}${stuck.length > 5 ? ", …" : ""}`,
    RUNBOOK.dstate,
    { processes: stuck },
  );
}
