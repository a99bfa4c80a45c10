// VM test files share a kernel: dm errors that earlier files provoked on purpose (dm-flakey, full
// pools) are still in its log. A test's fresh state dir starts its kernel-log cursor at "now".
import { checkDmesg } from "../../lib/health/dmesg.ts";
import { procIo } from "../../lib/health/index.ts";

export async function primeKernelLogCursor(stateDir: string): Promise<void> {
  await checkDmesg(procIo, { stateDir, lookbackMs: 0 });
}
