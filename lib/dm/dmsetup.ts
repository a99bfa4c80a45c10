// Typed wrappers over dmsetup. State-changing calls go through the host dm queue (lib/exec.ts run()
// routes them there); reads don't.
// Never `remove --force`: a forced remove swaps in an error table under a live user.

import { ThinimgError } from "../errors.ts";
import { type CmdContext, type CmdResult, run } from "../exec.ts";
import { withHostQueue } from "../lock/host-queue.ts";
import { classifyDmError, DmError, dmRefusal, isDmError } from "./errors.ts";
import { udevArgs } from "./udev.ts";
import { assertDmName } from "./validate.ts";

export interface DmOpts {
  timeoutMs?: number;
  ctx?: CmdContext;
  /** exec.ts RunOptions.intentOnDisk: the caller's durable record already names the command. */
  intentOnDisk?: boolean;
}

export interface DmInfo {
  name: string;
  state: "ACTIVE" | "SUSPENDED";
  readOnly: boolean;
  /** Live table loaded. */
  live: boolean;
  /** An inactive table is loaded and waiting for resume. */
  inactive: boolean;
  open: number;
  major: number;
  minor: number;
  eventNr: number;
  targets: number;
  uuid: string;
}

export const DMSETUP_TIMEOUT_MS = 30_000;

async function dmsetup(args: string[], o: DmOpts = {}, probe = false, stdout: "pipe" | "ignore" = "pipe"): Promise<CmdResult> {
  const u = udevArgs();
  return run(["dmsetup", ...u.flags, ...args], {
    timeoutMs: o.timeoutMs ?? DMSETUP_TIMEOUT_MS,
    ctx: o.ctx,
    env: u.env,
    probe,
    stdout,
    intentOnDisk: o.intentOnDisk,
  });
}

async function dmsetupOk(args: string[], o: DmOpts = {}, hint?: string, stdout: "pipe" | "ignore" = "pipe"): Promise<CmdResult> {
  const r = await dmsetup(args, o, false, stdout);
  if (r.timedOut || r.exitCode !== 0) throw new DmError(classifyDmError(r), r, hint);
  return r;
}

function mutate(args: string[], o: DmOpts, hint?: string): Promise<CmdResult> {
  return dmsetupOk(args, o, hint);
}

export function mapperPath(name: string): string {
  return `/dev/mapper/${assertDmName(name)}`;
}

export async function create(name: string, table: string, o: DmOpts & { readOnly?: boolean; uuid?: string } = {}): Promise<void> {
  assertDmName(name);
  if (o.uuid !== undefined) assertDmName(o.uuid, "device uuid");
  const args = ["create", name, ...(o.readOnly ? ["--readonly"] : []), ...(o.uuid ? ["--uuid", o.uuid] : [])];
  // dmsetup reports an existing name as EBUSY on create; tell the two apart for the caller.
  const r = await dmsetup([...args, "--table", table], { ...o, ctx: { device_name: name, ...o.ctx } }, false, "ignore");
  if (r.timedOut || r.exitCode !== 0) {
    let kind = classifyDmError(r);
    if (kind === "busy" && (await info(name, o)) !== null) kind = "exists";
    throw new DmError(kind, r);
  }
}

export async function remove(name: string, o: DmOpts = {}): Promise<void> {
  assertDmName(name);
  await mutate(["remove", name], { ...o, ctx: { device_name: name, ...o.ctx } });
}

export async function suspend(name: string, o: DmOpts = {}): Promise<void> {
  assertDmName(name);
  await mutate(["suspend", name], { ...o, ctx: { device_name: name, ...o.ctx } });
}

export async function resume(name: string, o: DmOpts = {}): Promise<void> {
  assertDmName(name);
  await mutate(["resume", name], { ...o, ctx: { device_name: name, ...o.ctx } });
}

/**
 * Run fn with the device suspended; it is resumed whatever fn does (ADR-0001 §5: a suspended device
 * is an outage). A suspend that failed or timed out may still have landed — the kernel call can
 * finish after dmsetup was killed — so then the device is looked at and resumed if it is (or, after
 * a timeout, may yet be) suspended. A failing resume never hides the first error: both are reported.
 * The host dm queue is held from the suspend to the resume: no other process's command can slip in
 * between and hang on the suspended device while the resume waits for the queue.
 */
export function withSuspended<T>(name: string, fn: () => Promise<T>, o: DmOpts = {}): Promise<T> {
  return withHostQueue(`dmsetup suspend ${name} … resume ${name}`, () => suspended(name, fn, o));
}

async function suspended<T>(name: string, fn: () => Promise<T>, o: DmOpts): Promise<T> {
  try {
    await suspend(name, o);
  } catch (e) {
    await resumeAfterFailedSuspend(name, e, o);
    throw e;
  }
  let failed = false;
  let failure: unknown;
  let value: T | undefined;
  try {
    value = await fn();
  } catch (e) {
    failed = true;
    failure = e;
  }
  try {
    await resume(name, o);
  } catch (re) {
    if (failed) throw stillSuspended(name, failure, re);
    throw re;
  }
  if (failed) throw failure;
  return value as T;
}

async function resumeAfterFailedSuspend(name: string, suspendErr: unknown, o: DmOpts): Promise<void> {
  const timedOut = isDmError(suspendErr, "timeout");
  let state: DmInfo | null | undefined;
  try {
    state = await info(name, o);
  } catch {
    state = undefined; // unknown: treated like "may be suspended" below
  }
  if (state === null) return; // no such device: nothing to resume
  // After a timeout the suspend may land later: resume anyway (a no-op on an active device; the
  // kernel serializes it behind the pending suspend) — unless an inactive table is waiting, which a
  // resume would swap in.
  const resumeNeeded = state?.state === "SUSPENDED" || ((timedOut || state === undefined) && !state?.inactive);
  if (!resumeNeeded) return;
  try {
    await resume(name, o);
  } catch (re) {
    throw stillSuspended(name, suspendErr, re);
  }
}

/** Both errors, one line: what went wrong first, and that the device may be left suspended. */
function stillSuspended(name: string, first: unknown, resumeErr: unknown): ThinimgError {
  const msg = (e: unknown) => (e instanceof Error ? e.message : String(e));
  return new ThinimgError("dm", `${msg(first)}; then resuming ${name} failed: ${msg(resumeErr)} — ${name} may be left SUSPENDED`, {
    hint: `check with dmsetup info ${name} and resume it by hand (dmsetup resume ${name}); I/O to it is queued until then`,
    cause: first,
    details: { device_name: name, first_error: msg(first), resume_error: msg(resumeErr) },
  });
}

export async function reload(name: string, table: string, o: DmOpts = {}): Promise<void> {
  assertDmName(name);
  await mutate(["reload", name, "--table", table], { ...o, ctx: { device_name: name, ...o.ctx } });
}

export async function message(poolName: string, msg: string, o: DmOpts = {}): Promise<void> {
  assertDmName(poolName, "pool name");
  if (!/^[a-z_]+( \d+)*$/.test(msg)) throw dmRefusal(["dmsetup", "message", poolName, "0", msg], "refused: malformed pool message");
  // a pool message prints nothing: no stdout pipe to make and drain (stderr still classifies failures)
  await dmsetupOk(["message", poolName, "0", msg], { ...o, ctx: { pool_name: poolName, ...o.ctx } }, undefined, "ignore");
}

/** Raw status text ("start len target args…"); throws DmError not_found when absent. */
export async function status(name: string, o: DmOpts = {}): Promise<string> {
  assertDmName(name);
  const r = await dmsetupOk(["status", name], { ...o, ctx: { device_name: name, ...o.ctx } });
  return r.stdout.trim();
}

export async function table(name: string, o: DmOpts = {}): Promise<string> {
  assertDmName(name);
  const r = await dmsetupOk(["table", name], { ...o, ctx: { device_name: name, ...o.ctx } });
  return r.stdout.trim();
}

const INFO_FIELDS = "name,attr,open,major,minor,events,segments,uuid";

export function parseInfoLine(line: string): DmInfo | null {
  const f = line.split("|");
  if (f.length < 8) return null;
  const [name, attr, open, major, minor, events, segments, ...uuid] = f as [string, string, ...string[]];
  return {
    name,
    live: attr[0] === "L",
    inactive: attr[1] === "I",
    state: attr[2] === "s" ? "SUSPENDED" : "ACTIVE",
    readOnly: attr[3] === "r",
    open: Number(open),
    major: Number(major),
    minor: Number(minor),
    eventNr: Number(events),
    targets: Number(segments) || 0,
    uuid: uuid.join("|"),
  };
}

/** Info for one device, or null when there is none. */
export async function info(name: string, o: DmOpts = {}): Promise<DmInfo | null> {
  assertDmName(name);
  const r = await dmsetup(
    ["info", "-c", "--noheadings", "--separator", "|", "-o", INFO_FIELDS, name],
    { ...o, ctx: { device_name: name, ...o.ctx } },
    true, // "no such device" is an answer, not a failure
  );
  if (r.exitCode !== 0 || r.timedOut) {
    const kind = classifyDmError(r);
    if (kind === "not_found") return null;
    throw new DmError(kind, r);
  }
  return parseInfoLine(r.stdout.trim());
}

/** Info for every device (one call; for GC and listings). */
export async function infoAll(o: DmOpts = {}): Promise<DmInfo[]> {
  const r = await dmsetup(["info", "-c", "--noheadings", "--separator", "|", "-o", INFO_FIELDS], o);
  if (r.exitCode !== 0 || r.timedOut) throw new DmError(classifyDmError(r), r);
  if (/No devices found/.test(r.stdout)) return [];
  return r.stdout
    .split("\n")
    .map((l) => parseInfoLine(l.trim()))
    .filter((x): x is DmInfo => x !== null);
}

export function parseLs(out: string): { name: string; major: number; minor: number }[] {
  const res: { name: string; major: number; minor: number }[] = [];
  for (const line of out.split("\n")) {
    // "name\t(254:0)" or, with --target, "name\t(254, 0)"
    const m = /^(\S+)\s+\((\d+)(?::|,\s*)(\d+)\)\s*$/.exec(line.trim());
    if (m) res.push({ name: m[1]!, major: Number(m[2]), minor: Number(m[3]) });
  }
  return res;
}

export async function ls(target?: "thin" | "thin-pool", o: DmOpts = {}) {
  const r = await dmsetupOk(["ls", ...(target ? ["--target", target] : [])], o);
  return parseLs(r.stdout);
}

export async function exists(name: string, o: DmOpts = {}): Promise<boolean> {
  return (await info(name, o)) !== null;
}

/** Loaded dm targets, e.g. { "thin-pool": "v1.22.0" }. */
export async function targets(o: DmOpts = {}): Promise<Record<string, string>> {
  const r = await dmsetupOk(["targets"], o);
  const out: Record<string, string> = {};
  for (const line of r.stdout.split("\n")) {
    const m = /^(\S+)\s+(v\S+)/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}
