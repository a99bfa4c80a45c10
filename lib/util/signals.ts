// The one registry of "when this process is stopped or exits" cleanups. Commands (lib/exec.ts) and
// test VMs (lib/vm/uml.ts) run in their own process groups, so a signal to us does not reach them
// and they would outlive us; each registers a synchronous cleanup that kills what it started.
//
// On SIGINT/SIGTERM/SIGHUP: `eager` cleanups run at once. Then, after every listener of this
// dispatch has run, if another handler (a script's own: gc finishes its current step, serve drains)
// is still installed it owns the exit and the rest run on "exit"; if ours is the only one, every
// cleanup runs and we exit as the default action would (128 + signal number). On "exit", all run.

export const STOP_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
export type StopSignal = (typeof STOP_SIGNALS)[number];
const SIGNO: Record<StopSignal, number> = { SIGINT: 2, SIGTERM: 15, SIGHUP: 1 };

export interface StopCleanup {
  /** Synchronous: it may run on "exit". Must be safe to run more than once. */
  run: () => void;
  /** Run as soon as a stop signal arrives, even when a script handles the signal itself. */
  eager?: boolean;
}

const cleanups = new Set<StopCleanup>();

function runAll(eagerOnly: boolean): void {
  for (const c of [...cleanups]) if (!eagerOnly || c.eager) c.run();
}

const runOnExit = () => runAll(false);

const onSignal = (sig: StopSignal) => () => {
  runAll(true);
  const foreign = () => process.listeners(sig).some((l) => l !== handlers[sig]);
  const decide = () => {
    if (foreign()) return;
    runAll(false);
    process.exit(128 + SIGNO[sig]);
  };
  if (foreign()) setImmediate(decide);
  else decide();
};
const handlers = Object.fromEntries(STOP_SIGNALS.map((s) => [s, onSignal(s)])) as Record<StopSignal, () => void>;
let installed = false;

/**
 * Register `c` until the returned function is called. Register BEFORE starting what it cleans up:
 * a signal that arrives while Bun.spawn runs is handled (in JS) only after the spawn returned, and
 * without a handler installed the default action would kill us and orphan the new process.
 */
export function onStop(c: StopCleanup): () => void {
  cleanups.add(c);
  if (!installed) {
    installed = true;
    for (const s of STOP_SIGNALS) process.on(s, handlers[s]);
    process.on("exit", runOnExit);
  }
  return () => {
    cleanups.delete(c);
    if (cleanups.size > 0 || !installed) return;
    installed = false;
    for (const s of STOP_SIGNALS) process.off(s, handlers[s]);
    process.off("exit", runOnExit);
  };
}
