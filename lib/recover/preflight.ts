// recover-pool's first step: the tools it runs are installed and the kernel has device-mapper.
import { ThinimgError } from "../errors.ts";
import { run } from "../exec.ts";
import { dmArgv, type RecoverRun } from "./run.ts";

export const TOOL_PACKAGES: Record<string, string> = {
  dmsetup: "dmsetup",
  losetup: "mount", // util-linux's losetup ships in Debian's "mount" package
  thin_check: "thin-provisioning-tools",
  thin_repair: "thin-provisioning-tools",
};

export async function preflight(r: RecoverRun): Promise<void> {
  const tools = ["dmsetup", "losetup", "thin_check", ...(r.o.repair ? ["thin_repair"] : [])];
  for (const t of tools) {
    if (!r.probe.which(t)) {
      throw new ThinimgError("missing", `${t} is not installed (not on PATH)`, {
        hint: `install it: apt-get install -y ${TOOL_PACKAGES[t]} (or bash scripts/setup.sh)`,
      });
    }
  }
  // /dev/mapper/control can exist without a driver behind it (dmsetup creates the node): ask the kernel.
  const v = dmArgv("version");
  const res = await run(v.argv, { timeoutMs: 10_000, env: v.env });
  if (res.timedOut || res.exitCode !== 0) {
    const why = res.stderr.split("\n").find((l) => l.trim()) ?? `exit ${res.exitCode}`;
    throw new ThinimgError("missing", `device-mapper is not available in this kernel (dmsetup version: ${why.trim()})`, {
      hint: "load it: modprobe dm-thin-pool (for tests, run inside the VM: bun scripts/vm.ts -- …)",
    });
  }
  r.rb.note("preflight", `${tools.join(", ")} present; device-mapper available`);
}
