// Which host environment variables a VM run carries in. A safelist, not a blocklist: whatever is not
// named here (tokens, SSH agents, shell state) stays on the host.

const EXACT = new Set(["PATH", "HOME", "CI", "TERM", "LANG", "LC_ALL", "TZ"]);
const PREFIXES = ["THINIMG_", "AWS_", "S3_"];

/** Directories dm tooling lives in; added to PATH inside the VM when the host's PATH lacks them. */
const SBIN = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

const NAME_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;

export function isCarried(name: string): boolean {
  return EXACT.has(name) || PREFIXES.some((p) => name.startsWith(p));
}

/** The environment the command sees inside the VM: safelisted host vars plus DM_DISABLE_UDEV=1. */
export function vmEnv(source: Record<string, string | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(source)) {
    if (v === undefined || !NAME_RE.test(k) || !isCarried(k)) continue;
    out[k] = v;
  }
  const path = (out.PATH ?? "").split(":").filter(Boolean);
  for (const d of SBIN) if (!path.includes(d)) path.push(d);
  out.PATH = path.join(":");
  out.HOME ??= "/root";
  // No udevd in the VM: dmsetup must never wait for a udev cookie.
  out.DM_DISABLE_UDEV = "1";
  return out;
}
