// Pre-flight health checks before an operation's dm work (lib/health): pool state and use, D-state
// processes, kernel log, memory, iowait — with this host's settings. Blocks the operation with the
// check's one-line reason and runbook.
import { assertHealthy } from "../health/index.ts";
import type { Ctx } from "../pool/context.ts";

export async function preflight(ctx: Ctx): Promise<void> {
  await assertHealthy({ pool: ctx.cfg.pool, stateDir: ctx.cfg.stateDir, kernelErrorWindowMs: ctx.cfg.kernelErrorWindowMs });
}
