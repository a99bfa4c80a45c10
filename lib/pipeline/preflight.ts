// Pre-flight health checks before dm work (lib/health): pool state and use, D-state processes,
// kernel log, memory, iowait. Blocks the operation with the check's one-line reason and runbook.
import { assertHealthy } from "../health/index.ts";

export async function preflight(o: { pool: string; stateDir: string; kernelErrorWindowMs?: number }): Promise<void> {
  await assertHealthy({ pool: o.pool, stateDir: o.stateDir, kernelErrorWindowMs: o.kernelErrorWindowMs });
}
