// VM test files share a kernel: dm errors that earlier files provoked on purpose (dm-flakey, full
// pools) are still in its log. A test's fresh state dir starts its kernel-log cursor at "now".
import { checkDmesg } from "../../lib/health/dmesg.ts";
import { procIo } from "../../lib/health/index.ts";
import { acknowledgeFindings } from "../../lib/health/kernel-findings.ts";

export async function primeKernelLogCursor(stateDir: string): Promise<void> {
  await checkDmesg(procIo, { stateDir, lookbackMs: 0 });
}

/** What an operator does after reading them: `health` records the kernel's errors, `health --ack` acknowledges them. */
export async function acknowledgeKernelErrors(stateDir: string): Promise<void> {
  await checkDmesg(procIo, { stateDir, lookbackMs: 0 });
  await acknowledgeFindings(stateDir, { by: "test operator" });
}
