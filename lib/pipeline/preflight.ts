// Pre-flight health checks before an operation's dm work (lib/health): pool state and use, D-state
// processes, kernel log, memory, iowait — with this host's settings. Blocks the operation with the
// check's one-line reason and runbook.
import { assertHealthy, type HealthOptions } from "../health/index.ts";
import type { Ctx } from "../pool/context.ts";

/** The pre-flight's settings for this host: the pool, and the state dir's kernel-log cursor. */
export function preflightOptions(ctx: Ctx): HealthOptions {
  return { pool: ctx.cfg.pool, stateDir: ctx.cfg.stateDir, kernelErrorWindowMs: ctx.cfg.kernelErrorWindowMs };
}

export async function preflight(ctx: Ctx): Promise<void> {
  await assertHealthy(preflightOptions(ctx));
}

/** What runs as an operation's pre-flight: the synchronous checks above, or the service's gate on
 * its background checks (lib/server/health-gate.ts). */
export type Preflight = (ctx: Ctx) => Promise<void>;
