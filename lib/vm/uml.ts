// Run one command inside a User-Mode Linux VM with a real dm-thin kernel. The host's filesystem is
// the VM's root (hostfs), so files made inside persist and the caller's cwd means the same thing.
// The VM is always powered off: linux.uml runs in its own session (process group) and we kill that
// group on timeout, on SIGINT/SIGTERM/SIGHUP and on exit — UML forks helper processes (I/O threads,
// one host process per guest process), so killing only linux.uml would leave them behind. A detached
// watchdog does the same if this process is SIGKILLed and cannot clean up.
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { ThinimgError } from "../errors.ts";
import { groupProcesses } from "../util/proc.ts";
import { onStop } from "../util/signals.ts";
import { parseSize } from "../util/units.ts";
import { vmEnv } from "./env.ts";
import { type VmHost, vmHost } from "./host.ts";
import { buildInitScript, parseResult, RUN_FILES } from "./init.ts";

export type Sink = (chunk: Uint8Array) => void;

export interface VmOptions {
  argv: string[];
  /** VM RAM, e.g. "1G" (bytes as number also accepted). Bun and the VM tests run in 128M; 1G default. */
  mem?: string | number;
  /** Whole-run limit including boot; default 600 s. */
  timeoutMs?: number;
  /** Host environment to carry in (filtered through the safelist); default process.env. */
  env?: Record<string, string | undefined>;
  /** Working directory inside the VM; default process.cwd(). */
  cwd?: string;
  /** Receive the command's stdout/stderr live; when omitted they are collected into the result. */
  stdout?: Sink;
  stderr?: Sink;
  /** Receive kernel console output live (e.g. --verbose). */
  kernel?: Sink;
  /** Keep the run directory (debugging). */
  keep?: boolean;
  /** Extra kernel command-line arguments, appended (later ones win). */
  kernelArgs?: string[];
}

export interface VmResult {
  /** The command's exit code; null when the VM timed out before it finished. */
  exitCode: number | null;
  timedOut: boolean;
  kernelLog: string;
  /** Collected output (only when no sink was given). */
  stdout: string;
  stderr: string;
  durationMs: number;
  runDir: string;
  /** Host process group(s) the VM ran in (linux.uml's own session). */
  processGroups: number[];
}

/** The VM did not boot, or its init could not prepare the system. */
export class VmError extends ThinimgError {
  readonly kernelLog: string;
  constructor(message: string, kernelLog: string, hint?: string) {
    super("internal", message, { hint, exitCode: 125, details: { kernel_log_tail: tail(kernelLog, 30) } });
    this.name = "VmError";
    this.kernelLog = kernelLog;
  }
}

export const DEFAULT_VM_MEM = "1G";
export const DEFAULT_VM_TIMEOUT_MS = 600_000;
const POLL_MS = 40;
const MIN_MEM = 64 * 1024 ** 2;

export function tail(text: string, lines: number): string {
  return text.split("\n").filter(Boolean).slice(-lines).join("\n");
}

/** Where UML puts its (unlinked) RAM file: tmpfs when there is one, so guest RAM is not disk I/O. */
function umlTmp(): string {
  return existsSync("/dev/shm") ? "/dev/shm" : "/tmp";
}

function memArg(mem: string | number): string {
  const bytes = typeof mem === "number" ? mem : parseSize(mem, "--mem");
  if (bytes < MIN_MEM) throw new ThinimgError("usage", `--mem ${mem} is too small`, { hint: "use at least 64M (bun needs about 128M; default 1G)" });
  return `${Math.floor(bytes / 1024 ** 2)}M`;
}

// ---- live VM registry: everything here is killed on signals and on exit ----

interface LiveVm {
  /** linux.uml's pid = its process group (spawned detached: setsid). */
  group: number;
  umid: string;
  watchdog: number | null;
  /** Remove the run directory when the process is going down (signal/exit path). */
  cleanup: () => void;
}
const live = new Map<number, LiveVm>();

/** Pids whose argv carries umid=<umid> (UML helpers keep linux.uml's argv). */
function umidProcesses(umid: string): number[] {
  const needle = `umid=${umid}`;
  const found: number[] = [];
  let pids: string[] = [];
  try {
    pids = readdirSync("/proc").filter((p) => /^\d+$/.test(p));
  } catch {
    return found;
  }
  for (const pid of pids) {
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, "latin1").split("\0").includes(needle)) found.push(Number(pid));
    } catch {}
  }
  return found;
}

function killQuiet(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {}
}

function killVm(vm: LiveVm): void {
  killQuiet(-vm.group);
  // belt and braces: anything carrying our umid that left the group
  for (const pid of umidProcesses(vm.umid)) killQuiet(pid);
}

/** Stop the watchdog (its own session: the shell and its sleep). */
function stopWatchdog(vm: LiveVm): void {
  if (vm.watchdog !== null) killQuiet(-vm.watchdog);
  vm.watchdog = null;
}

function killAll(): void {
  const vms = [...live.values()];
  live.clear();
  for (const vm of vms) killVm(vm);
  const groups = vms.map((vm) => vm.group);
  for (let i = 0; i < 200 && vmProcessesLeft(groups).length > 0; i++) {
    Bun.sleepSync(10);
    for (const vm of vms) killVm(vm);
  }
  for (const vm of vms) {
    stopWatchdog(vm);
    vm.cleanup();
  }
}

// Eager: a VM is killed as soon as we are stopped, even when the script handles the signal.
let unregisterStop: (() => void) | null = null;

function install(): void {
  unregisterStop ??= onStop({ run: killAll, eager: true });
}

function uninstall(): void {
  unregisterStop?.();
  unregisterStop = null;
}

/** Host processes (pid, state) still alive in the VM's process groups; zombies excluded (tests). */
export const vmProcessesLeft = (groups: number[]) => groupProcesses(groups);

// ---- output tailing: the VM writes through hostfs into files we poll ----

class Tailer {
  private fd: number;
  private offset = 0;
  private buf = new Uint8Array(64 * 1024);
  private chunks: Uint8Array[] = [];
  constructor(
    path: string,
    private sink: Sink | undefined,
  ) {
    this.fd = openSync(path, "r");
  }
  drain(): void {
    for (;;) {
      const n = readSync(this.fd, this.buf, 0, this.buf.length, this.offset);
      if (n <= 0) return;
      this.offset += n;
      const chunk = this.buf.slice(0, n);
      if (this.sink) this.sink(chunk);
      else this.chunks.push(chunk);
    }
  }
  close(): string {
    this.drain();
    closeSync(this.fd);
    return Buffer.concat(this.chunks).toString("utf8");
  }
}

/**
 * If this process dies without cleaning up (SIGKILL, OOM), a detached shell kills the VM shortly
 * after its limit: the group, and anything still carrying its umid. Stopped when the VM ends.
 */
function startWatchdog(group: number, umid: string, afterS: number, removeDir: string | null): number | null {
  // the group is only killed while its leader is still our linux.uml (no pid-reuse accidents)
  // dash's kill takes no "--"; grep -z -x matches whole argv entries, so this script's own argv
  // (which contains the umid inside a longer string) never matches, and $$ is skipped anyway.
  const script = `sleep ${afterS}
if grep -qsazx 'umid=${umid}' /proc/${group}/cmdline; then kill -KILL -${group} 2>/dev/null; fi
for f in $(grep -lsazx 'umid=${umid}' /proc/[0-9]*/cmdline); do p=\${f#/proc/}; p=\${p%/cmdline}; [ "$p" = "$$" ] || kill -KILL "$p" 2>/dev/null; done${removeDir ? `\nrm -rf '${removeDir}'` : ""}`;
  try {
    const w = Bun.spawn(["sh", "-c", script], { stdin: "ignore", stdout: "ignore", stderr: "ignore", detached: true });
    w.unref();
    return w.pid;
  } catch {
    return null;
  }
}

function validateVmArgv(argv: string[]): void {
  if (argv.length === 0) throw new ThinimgError("usage", "no command given", { hint: "usage: bun scripts/vm.ts -- CMD ARG..." });
  for (const a of argv) {
    if (a.includes("\0")) throw new ThinimgError("usage", "command arguments cannot contain NUL bytes");
  }
}

/** A fresh run directory (its name is the VM's umid) with empty output files and the init script. */
function prepareRunDir(opts: VmOptions, host: VmHost, cwd: string): { runDir: string; umid: string; file: (f: string) => string } {
  const runDir = mkdtempSync("/tmp/thinimg-vm-");
  const umid = runDir.slice("/tmp/".length);
  const file = (f: string) => `${runDir}/${f}`;
  for (const f of [RUN_FILES.stdout, RUN_FILES.stderr, RUN_FILES.kernelLog]) writeFileSync(file(f), "");
  writeFileSync(
    file(RUN_FILES.init),
    buildInitScript({ runDir, argv: opts.argv, env: vmEnv(opts.env ?? process.env), cwd, driversDir: host.driversDir, insmod: host.insmod }),
    { mode: 0o755 },
  );
  return { runDir, umid, file };
}

/** Boot linux.uml in its own process group, its console into the kernel log file. */
function spawnUml(
  opts: VmOptions,
  host: VmHost,
  mem: string,
  run: { runDir: string; umid: string; file: (f: string) => string },
): { proc: ReturnType<typeof Bun.spawn>; started: number } {
  const { runDir, umid, file } = run;
  const kernelFd = openSync(file(RUN_FILES.kernelLog), "a");
  const started = performance.now();
  const proc = Bun.spawn(
    [
      host.linuxUml,
      `mem=${mem}`,
      `umid=${umid}`,
      `uml_dir=${runDir}`,
      "root=/dev/root",
      "rootfstype=hostfs",
      "rootflags=/",
      "rw",
      "quiet",
      `init=${file(RUN_FILES.init)}`,
      "con=null",
      "con0=fd:0,fd:1",
      "ssl=null",
      ...(opts.kernelArgs ?? []),
    ],
    // cwd: a crashing UML (panic → SIGABRT) must not drop files into the caller's directory
    { stdin: "ignore", stdout: kernelFd, stderr: kernelFd, detached: true, cwd: runDir, env: { PATH: process.env.PATH ?? "/usr/bin:/bin", TMPDIR: umlTmp() } },
  );
  closeSync(kernelFd);
  return { proc, started };
}

/** Wait for the VM (killing it at its limit) while tailing its output; then make sure nothing of it
 * is left running. Returns whether it timed out. */
async function superviseVm(proc: ReturnType<typeof Bun.spawn>, vm: LiveVm, tailers: [Tailer, Tailer, Tailer], timeoutMs: number): Promise<boolean> {
  const [out, err, klog] = tailers;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    killVm(vm);
  }, timeoutMs);
  const poll = setInterval(() => {
    out.drain();
    err.drain();
    klog.drain();
  }, POLL_MS);
  try {
    await proc.exited;
  } finally {
    clearTimeout(timer);
    clearInterval(poll);
    // The main UML process is gone; its helpers must be too.
    killVm(vm);
    // SIGKILL lands asynchronously; wait (bounded) until nothing of the VM is still running.
    for (let i = 0; i < 100 && vmProcessesLeft([vm.group]).length > 0; i++) {
      await Bun.sleep(20);
      killVm(vm);
    }
    stopWatchdog(vm);
    live.delete(proc.pid);
    if (live.size === 0) uninstall();
  }
  return timedOut;
}

export async function runInVm(opts: VmOptions): Promise<VmResult> {
  validateVmArgv(opts.argv);
  const host = vmHost();
  const mem = memArg(opts.mem ?? DEFAULT_VM_MEM);
  const timeoutMs = opts.timeoutMs ?? DEFAULT_VM_TIMEOUT_MS;
  const cwd = opts.cwd ?? process.cwd();
  if (!existsSync(cwd)) throw new ThinimgError("usage", `working directory ${cwd} does not exist`, { hint: "run from (or pass) an existing directory" });

  const run = prepareRunDir(opts, host, cwd);
  const { runDir, umid, file } = run;
  const { proc, started } = spawnUml(opts, host, mem, run);
  const vm: LiveVm = {
    group: proc.pid,
    umid,
    watchdog: null,
    cleanup: () => {
      if (!opts.keep) rmSync(runDir, { recursive: true, force: true });
    },
  };
  live.set(proc.pid, vm);
  install();
  vm.watchdog = startWatchdog(proc.pid, umid, Math.ceil(timeoutMs / 1000) + 10, opts.keep ? null : runDir);

  const out = new Tailer(file(RUN_FILES.stdout), opts.stdout);
  const err = new Tailer(file(RUN_FILES.stderr), opts.stderr);
  const klog = new Tailer(file(RUN_FILES.kernelLog), opts.kernel);
  const timedOut = await superviseVm(proc, vm, [out, err, klog], timeoutMs);
  const stdout = out.close();
  const stderr = err.close();
  klog.close();
  const kernelLog = readFileSync(file(RUN_FILES.kernelLog), "utf8");
  let resultText: string | null = null;
  try {
    resultText = readFileSync(file(RUN_FILES.result), "utf8");
  } catch {}
  vm.cleanup();
  const durationMs = Math.round(performance.now() - started);

  const processGroups = [vm.group];
  const result = parseResult(resultText);
  if (result.kind === "setup-failed") {
    throw new VmError(
      `VM setup failed: ${result.message}`,
      kernelLog,
      "see the kernel log above; check the UML modules (apt-get install --reinstall user-mode-linux)",
    );
  }
  if (result.kind === "rc") {
    return { exitCode: result.exitCode, timedOut: false, kernelLog, stdout, stderr, durationMs, runDir, processGroups };
  }
  if (timedOut) return { exitCode: null, timedOut: true, kernelLog, stdout, stderr, durationMs, runDir, processGroups };
  throw new VmError(
    `VM did not boot or died before the command finished (linux.uml exit ${proc.exitCode ?? proc.signalCode}, no result marker)`,
    kernelLog,
    "see the kernel log tail (a panic or an init failure); try --mem 1G and check that /tmp is writable",
  );
}
