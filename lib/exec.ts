// The one way thinimg runs an external command: argv array (never a shell), a hard timeout with
// SIGTERM→SIGKILL escalation (Bun.spawn's own timeout cannot escalate), and exactly one structured
// record per call. Tests swap the runner with setRunner() to unit-test decision logic.
import { appendFileSync } from "node:fs";
import { journal } from "./cmd-journal.ts";
import { type ErrorKind, ThinimgError } from "./errors.ts";
import { assertNotTainted, isStateChanging, noteTimeout, withHostQueue } from "./lock/host-queue.ts";
import { logCommandRecord, logCommandStart } from "./log.ts";
import { groupProcesses } from "./util/proc.ts";
import { onStop } from "./util/signals.ts";

export interface CmdContext {
  pool_name?: string | undefined;
  device_id?: number | undefined;
  device_name?: string | undefined;
}

export interface RunOptions {
  /** Hard limit; default 30 s. */
  timeoutMs?: number;
  /** Time between SIGTERM and SIGKILL once the timeout hits; default 2 s. */
  killGraceMs?: number;
  ctx?: CmdContext;
  stdin?: string | Uint8Array;
  env?: Record<string, string | undefined>;
  cwd?: string;
  /** A non-zero exit is an expected answer here (a probe): log it at debug, not warn. */
  probe?: boolean;
  /** "ignore": the command prints nothing we read (a pool message): no pipe, result stdout "". */
  stdout?: "pipe" | "ignore";
  /**
   * The caller's own durable record already names this command before it is sent (a GC delete's
   * `deleting` row; an activation's committed steps; synchronous=FULL): its before-record is written, not fsync'd on
   * its own (the next fsync'd record carries it to disk; ADR-0001 §4).
   */
  intentOnDisk?: boolean;
}

export interface CmdResult {
  argv: string[];
  stdout: string;
  stderr: string;
  /** null when killed by a signal. */
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  durationMs: number;
}

/** The structured record every command emits (stable keys). */
export interface CmdRecord {
  event: "cmd";
  pool_name: string | null;
  device_id: number | null;
  device_name: string | null;
  command: string;
  duration_ms: number;
  exit_code: number | null;
  timed_out: boolean;
  /** RFC 3339 with milliseconds (UTC): when the command was spawned. */
  started_at: string;
}

/** Written (and fsync'd to the state dir's command journal) before a state-changing command is
 * spawned: the same keys, the outcome still null. */
export interface CmdStartRecord extends Omit<CmdRecord, "event" | "duration_ms" | "exit_code" | "timed_out"> {
  event: "cmd_start";
  duration_ms: null;
  exit_code: null;
  timed_out: null;
}

export type Runner = (argv: string[], opts?: RunOptions) => Promise<CmdResult>;

export const DEFAULT_TIMEOUT_MS = 30_000;

/** probe: a non-zero exit was an expected answer (not a failure). */
type RecordListener = (rec: CmdRecord, probe: boolean) => void;
const listeners = new Set<RecordListener>();

/** Subscribe to command records (tests, progress UIs). Returns an unsubscribe function. */
export function onCommandRecord(fn: RecordListener): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function emitRecord(r: CmdResult, ctx: CmdContext | undefined, startedAt: Date, probe = false): void {
  const rec: CmdRecord = {
    event: "cmd",
    pool_name: ctx?.pool_name ?? null,
    device_id: ctx?.device_id ?? null,
    device_name: ctx?.device_name ?? null,
    command: r.argv.join(" "),
    duration_ms: r.durationMs,
    exit_code: r.exitCode,
    timed_out: r.timedOut,
    started_at: startedAt.toISOString(),
  };
  for (const fn of listeners) fn(rec, probe);
  // the after-record is not fsync'd on its own: the next before-record's fsync flushes it with it,
  // and a crash before that loses only an outcome the journal cannot promise anyway
  if (isStateChanging(r.argv)) journal(rec, { sync: false });
  const file = process.env.THINIMG_CMD_LOG;
  if (file) {
    try {
      appendFileSync(file, `${JSON.stringify(rec)}\n`);
    } catch {
      // an unwritable audit file must not break dm work
    }
  }
  logCommandRecord({ ...rec }, r.timedOut || (r.exitCode !== 0 && !probe));
}

// ---- live child groups: killed when this process is stopped or exits ----
// Every command runs in its own process group (detached), so a signal to thinimg does not reach it
// and it would outlive us. The stop registry (util/signals.ts) gives each live group SIGTERM, then
// SIGKILL, unless the script handles the signal itself (then on exit).

const liveGroups = new Set<number>();
/** How long the exit path waits after SIGTERM before SIGKILL. */
const EXIT_GRACE_MS = 500;

function signalGroup(group: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-group, sig);
  } catch {}
}

/** SIGTERM every live group, wait briefly, SIGKILL what is left. Synchronous: runs on "exit". */
export function killChildGroups(): void {
  if (liveGroups.size === 0) return;
  const groups = new Set(liveGroups);
  liveGroups.clear();
  for (const g of groups) signalGroup(g, "SIGTERM");
  const until = performance.now() + EXIT_GRACE_MS;
  while (performance.now() < until && groupProcesses(groups).length > 0) Bun.sleepSync(10);
  for (const g of groups) signalGroup(g, "SIGKILL");
}

/** Process groups of commands still running (a service's drain waits for none). */
export function liveChildGroups(): number[] {
  return [...liveGroups];
}

let stopRegistered = false;

/** Before a spawn (see onStop): the group is registered only after Bun.spawn returns. Registered
 * once, for the process's life (with no live group it does nothing, and a stop signal then ends the
 * process as its default action would): adding and removing three signal handlers around every
 * command cost ~1 ms a command in the test VM, on the activation hot path. */
function installStopHandlers(): void {
  if (stopRegistered) return;
  stopRegistered = true;
  onStop({ run: killChildGroups });
}

function untrackGroup(group: number | null): void {
  if (group !== null) liveGroups.delete(group);
}

function validateArgv(argv: string[]): void {
  if (argv.length === 0) throw new ThinimgError("internal", "empty command");
  for (const a of argv) {
    if (typeof a !== "string" || a.includes("\0")) {
      throw new ThinimgError("internal", `invalid argument for ${argv[0]}: ${JSON.stringify(a)}`);
    }
  }
}

type Spawned = ReturnType<typeof Bun.spawn>;

/** Spawn argv in its own process group, tracked as live until it exits. A failed spawn (ENOENT:
 * the binary is missing) is recorded and returned as the command's result. */
function spawnTracked(argv: string[], opts: RunOptions, started: number, startedAt: Date): { proc: Spawned } | { failed: CmdResult } {
  let proc: Spawned;
  installStopHandlers();
  try {
    proc = Bun.spawn(argv, {
      stdin: opts.stdin === undefined ? "ignore" : new Blob([opts.stdin]),
      stdout: opts.stdout ?? "pipe",
      stderr: "pipe",
      env: opts.env ? { ...process.env, ...opts.env } : process.env,
      cwd: opts.cwd,
      // own process group: a timeout kills the command and anything it spawned
      detached: true,
    });
  } catch (e) {
    untrackGroup(null);
    // ENOENT: the binary is missing. Still one record, exit_code null.
    const r: CmdResult = {
      argv,
      stdout: "",
      stderr: String((e as Error).message ?? e),
      exitCode: 127,
      signal: null,
      timedOut: false,
      durationMs: Math.round(performance.now() - started),
    };
    emitRecord(r, opts.ctx, startedAt, opts.probe);
    return { failed: r };
  }
  const group = proc.pid;
  liveGroups.add(group);
  proc.exited.then(
    () => untrackGroup(group),
    () => untrackGroup(group),
  );
  return { proc };
}

interface Deadline {
  timedOut: boolean;
  termTimer: ReturnType<typeof setTimeout> | undefined;
  killTimer: ReturnType<typeof setTimeout> | undefined;
}

/** The command's time limit: at timeoutMs SIGTERM to its group, graceMs later SIGKILL. */
function armDeadline(proc: Spawned, timeoutMs: number, graceMs: number): Deadline {
  const d: Deadline = { timedOut: false, termTimer: undefined, killTimer: undefined };
  const killGroup = (sig: NodeJS.Signals) => {
    try {
      process.kill(-proc.pid, sig);
    } catch {
      try {
        proc.kill(sig);
      } catch {}
    }
  };
  d.termTimer = setTimeout(() => {
    d.timedOut = true;
    killGroup("SIGTERM");
    d.killTimer = setTimeout(() => killGroup("SIGKILL"), graceMs);
  }, timeoutMs);
  return d;
}

export const spawnRunner: Runner = async (argv, opts = {}) => {
  validateArgv(argv);
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const graceMs = opts.killGraceMs ?? 2_000;
  const started = performance.now();
  const startedAt = new Date();
  const spawned = spawnTracked(argv, opts, started, startedAt);
  if ("failed" in spawned) return spawned.failed;
  const { proc } = spawned;
  const deadline = armDeadline(proc, timeoutMs, graceMs);
  const out = proc.stdout instanceof ReadableStream ? new Response(proc.stdout).text() : Promise.resolve("");
  const err = new Response(proc.stderr as ReadableStream).text();
  // A process in uninterruptible sleep (D state, e.g. I/O on a suspended device) ignores even
  // SIGKILL. Waiting for it would wedge us too, so past timeout + grace + 1 s we return without it.
  const abandonAfter = timeoutMs + graceMs + 1_000;
  const exited = await within(
    proc.exited.then(() => true),
    abandonAfter,
    false,
  );
  clearTimeout(deadline.termTimer);
  if (deadline.killTimer && exited) clearTimeout(deadline.killTimer);
  if (!exited) {
    const r: CmdResult = {
      argv,
      stdout: "",
      stderr: `process ${proc.pid} did not exit after SIGKILL (uninterruptible sleep?); abandoned`,
      exitCode: null,
      signal: "SIGKILL",
      timedOut: true,
      durationMs: Math.round(performance.now() - started),
    };
    emitRecord(r, opts.ctx, startedAt, opts.probe);
    return r;
  }
  // A grandchild that left the group may still hold the pipes: never wait on it for long.
  const drained = await within(Promise.all([out, err]), 1_000, null);
  const [stdout, stderr] = drained ?? ["", "(output not drained: a child process kept the pipe open)"];
  const r: CmdResult = {
    argv,
    stdout,
    stderr,
    exitCode: proc.signalCode ? null : proc.exitCode,
    signal: proc.signalCode ? String(proc.signalCode) : null,
    timedOut: deadline.timedOut,
    durationMs: Math.round(performance.now() - started),
  };
  emitRecord(r, opts.ctx, startedAt, opts.probe);
  return r;
};

/** p, or `fallback` after ms. The timer is cleared when p settles: a pending timer (Bun.sleep
 * cannot be cancelled) would keep a library caller's process alive for the command's whole limit. */
function within<T, F>(p: Promise<T>, ms: number, fallback: F): Promise<T | F> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<F>((resolve) => {
    timer = setTimeout(() => resolve(fallback), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

let current: Runner = spawnRunner;

/** Replace the runner (unit tests only). Returns the previous one. */
export function setRunner(r: Runner): Runner {
  const prev = current;
  current = r;
  return prev;
}

/** Run a command. A state-changing one (lib/lock/host-queue.ts decides) waits for the host-wide dm
 * queue and holds it for exactly its own run, its before-record is on disk before it is spawned
 * (or, with intentOnDisk, the caller's own durable record names it), and
 * it is refused if an earlier command of this process timed out on the same device. */
export function run(argv: string[], opts?: RunOptions): Promise<CmdResult> {
  if (!isStateChanging(argv)) return current(argv, opts);
  assertNotTainted(argv, opts?.ctx);
  return withHostQueue(argv.join(" "), async () => {
    assertNotTainted(argv, opts?.ctx);
    emitStartRecord(argv, opts?.ctx, !opts?.intentOnDisk);
    const r = await current(argv, opts);
    if (r.timedOut) noteTimeout(argv, opts?.ctx);
    return r;
  });
}

function emitStartRecord(argv: string[], ctx: CmdContext | undefined, sync: boolean): void {
  const rec: CmdStartRecord = {
    event: "cmd_start",
    pool_name: ctx?.pool_name ?? null,
    device_id: ctx?.device_id ?? null,
    device_name: ctx?.device_name ?? null,
    command: argv.join(" "),
    duration_ms: null,
    exit_code: null,
    timed_out: null,
    started_at: new Date().toISOString(),
  };
  journal(rec, { sync });
  logCommandStart({ ...rec });
}

/** Error for a command that failed or timed out; dm/ code refines the kind from stderr (DmError is
 * a CommandError, so callers that catch CommandError keep catching what lib/dm throws). */
export class CommandError extends ThinimgError {
  readonly result: CmdResult;
  constructor(result: CmdResult, hint?: string, o: { kind?: ErrorKind; message?: string; details?: Record<string, unknown> } = {}) {
    const what = result.argv.join(" ");
    const why = result.timedOut
      ? `timed out after ${result.durationMs} ms`
      : result.exitCode === null
        ? `killed by ${result.signal}`
        : `exit ${result.exitCode}`;
    const detail = result.stderr.trim().split("\n").filter(Boolean).slice(-1)[0] ?? "";
    super(o.kind ?? (result.timedOut ? "timeout" : "dm"), o.message ?? `${what}: ${why}${detail ? `: ${detail}` : ""}`, {
      hint,
      details: o.details ?? { command: what, exit_code: result.exitCode, timed_out: result.timedOut, stderr: result.stderr },
    });
    this.name = "CommandError";
    this.result = result;
  }
}

/** Run and throw CommandError unless exit 0. */
export async function runOk(argv: string[], opts?: RunOptions): Promise<CmdResult> {
  const r = await run(argv, opts);
  if (r.timedOut || r.exitCode !== 0) throw new CommandError(r);
  return r;
}

/** True when `name` is on PATH (no command is run). */
export function which(name: string): string | null {
  return Bun.which(name);
}
