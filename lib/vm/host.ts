// Host prerequisites for the test VM: the UML kernel binary, its module tree, and insmod (run inside
// the VM from the host's filesystem). Missing pieces are named with the command that installs them.
import { existsSync, readdirSync } from "node:fs";
import { ThinimgError } from "../errors.ts";

export const INSTALL_HINT = "install it: apt-get install -y user-mode-linux kmod (or bash scripts/setup.sh)";

/** Load order matters: each module depends on the ones before it. Paths are relative to kernel/drivers. */
export const VM_MODULES: readonly { path: string; args?: string }[] = [
  { path: "block/loop.ko", args: "max_loop=64" },
  { path: "md/dm-mod.ko" },
  { path: "md/dm-bufio.ko" },
  { path: "md/persistent-data/dm-persistent-data.ko" },
  { path: "md/dm-bio-prison.ko" },
  { path: "md/dm-thin-pool.ko" },
  { path: "md/dm-flakey.ko" },
  { path: "md/dm-delay.ko" },
];

export interface VmHost {
  linuxUml: string;
  insmod: string;
  /** …/modules/<version>/kernel/drivers */
  driversDir: string;
}

const MODULES_ROOT = "/usr/lib/uml/modules";

function kernelVersion(linuxUml: string): string | null {
  try {
    const r = Bun.spawnSync([linuxUml, "--version"], { stdout: "pipe", stderr: "ignore", timeout: 5_000 });
    const v = r.stdout.toString().trim().split("\n")[0]?.trim();
    return v && /^[0-9][\w.+-]*$/.test(v) ? v : null;
  } catch {
    return null;
  }
}

/** Find everything a VM run needs or throw one ThinimgError("missing") naming the package. */
export function vmHost(probe: { which?: (bin: string) => string | null; exists?: (p: string) => boolean } = {}): VmHost {
  const which = probe.which ?? ((b: string) => Bun.which(b));
  const exists = probe.exists ?? existsSync;
  const linuxUml = which("linux.uml");
  if (!linuxUml) throw new ThinimgError("missing", "user-mode-linux is not installed (no linux.uml on PATH)", { hint: INSTALL_HINT });
  const insmod = ["/usr/sbin/insmod", "/sbin/insmod"].find((p) => exists(p));
  if (!insmod) throw new ThinimgError("missing", "kmod is not installed (no /usr/sbin/insmod)", { hint: INSTALL_HINT });
  let versions: string[] = [];
  try {
    versions = readdirSync(MODULES_ROOT).sort();
  } catch {}
  const wanted = kernelVersion(linuxUml);
  const version = wanted && versions.includes(wanted) ? wanted : versions.at(-1);
  if (!version) {
    throw new ThinimgError("missing", `no UML kernel modules under ${MODULES_ROOT}`, { hint: `re-${INSTALL_HINT}` });
  }
  const driversDir = `${MODULES_ROOT}/${version}/kernel/drivers`;
  for (const m of VM_MODULES) {
    if (!exists(`${driversDir}/${m.path}`)) {
      throw new ThinimgError("missing", `UML kernel module ${driversDir}/${m.path} is missing`, { hint: `re-${INSTALL_HINT}` });
    }
  }
  return { linuxUml, insmod, driversDir };
}
