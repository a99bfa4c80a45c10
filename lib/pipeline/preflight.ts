// Pre-flight health checks before dm work (lib/health, issue 2). Blocks the operation with the
// health module's one-line reason when the host or pool is unhealthy.
import { ThinimgError } from "../errors.ts";
import * as pool from "../dm/pool.ts";

type AssertHealthy = (o: { pool: string; stateDir: string }) => Promise<unknown>;
let cached: AssertHealthy | null = null;

async function healthModule(): Promise<AssertHealthy | null> {
  if (cached) return cached;
  try {
    const path = "../health/index.ts";
    const m = (await import(path)) as { assertHealthy?: AssertHealthy };
    if (typeof m.assertHealthy === "function") cached = m.assertHealthy;
  } catch {
    // not built yet: fall through to the minimal pool checks below
  }
  return cached;
}

export async function preflight(o: { pool: string; stateDir: string }): Promise<void> {
  const assertHealthy = await healthModule();
  if (assertHealthy) {
    await assertHealthy(o);
    return;
  }
  const st = await pool.poolStatus(o.pool).catch((e) => {
    throw new ThinimgError("unhealthy", `pool ${o.pool} is not usable: ${(e as Error).message}`, { hint: "create it with `bun ops/recover-pool.ts --create` or pass --pool" });
  });
  if (st.kind !== "ok") throw new ThinimgError("unhealthy", `pool ${o.pool} is in ${st.kind} state`, { hint: "follow docs/ops-recover-pool.md" });
  if (st.mode !== "rw" || st.needsCheck) throw new ThinimgError("unhealthy", `pool ${o.pool} is ${st.needsCheck ? "flagged needs_check" : st.mode}`, { hint: "run `bun scripts/health.ts`" });
}
