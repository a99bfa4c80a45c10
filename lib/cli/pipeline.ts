// Shared plumbing for the pipeline scripts (unpack, activate, release, list): flags → Config,
// context with a TTY progress line when appropriate.
import type { ArgsDef } from "citty";
import { type Config, loadConfig } from "../config.ts";
import { asHolder, type Ctx, makeCtx } from "../pool/context.ts";
import { isTerminal } from "../util/tty.ts";
import { kernelWindowArgs, type LimitFlags, limitInput, outputArgs, poolArgs, stateArgs } from "./args.ts";

export { asHolder };

import { noProgress, ttyProgress } from "./progress.ts";

export const waitArgs = {
  wait: { type: "string", description: "How long to wait for a lock held by another thinimg process (e.g. 30s, 10m; env THINIMG_LOCK_WAIT; default 5m)" },
} as const satisfies ArgsDef;

export const sizeArgs = {
  "virtual-size": { type: "string", description: "Virtual size of new base layer devices (env THINIMG_VIRTUAL_SIZE; default 10G)" },
} as const satisfies ArgsDef;

/** What every pipeline script takes besides its own positional: lock wait, state, pool, output. */
export const pipelineArgs = {
  ...waitArgs,
  ...kernelWindowArgs,
  ...stateArgs,
  ...poolArgs,
  ...outputArgs,
} as const satisfies ArgsDef;

interface CommonFlags extends LimitFlags {
  "state-dir"?: string | undefined;
  pool?: string | undefined;
  wait?: string | undefined;
  "virtual-size"?: string | undefined;
  "kernel-error-window"?: string | undefined;
  json?: boolean | undefined;
  "log-format"?: string | undefined;
}

export function configFrom(args: CommonFlags): Config {
  return loadConfig({
    stateDir: args["state-dir"],
    pool: args.pool,
    wait: args.wait,
    virtualSize: args["virtual-size"],
    kernelErrorWindow: args["kernel-error-window"],
    ...limitInput(args),
  });
}

/** The context of a command; with `existing`, it needs a state dir an unpack made (see openDb). */
export function ctxFrom(args: CommonFlags, o: { existing?: boolean } = {}): Ctx {
  const cfg = configFrom(args);
  const quiet = args.json || args["log-format"] === "json" || process.env.THINIMG_LOG_FORMAT === "json";
  // no progress line unless stderr is a terminal, asked without building the stderr stream
  return makeCtx(cfg, { progress: quiet || !isTerminal(2) ? noProgress : ttyProgress(), existing: o.existing });
}
