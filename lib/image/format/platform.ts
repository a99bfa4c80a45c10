// Platforms for multi-arch indexes: "os/arch[/variant]", defaulting to the host's.
import { usageError } from "../../errors.ts";

export interface PlatformSpec {
  os: string;
  architecture: string;
  variant: string | null;
}

const NODE_TO_OCI_ARCH: Record<string, string> = {
  x64: "amd64",
  arm64: "arm64",
  arm: "arm",
  ia32: "386",
  ppc64: "ppc64le",
  s390x: "s390x",
  riscv64: "riscv64",
  loong64: "loong64",
};

export function hostPlatform(): PlatformSpec {
  const architecture = NODE_TO_OCI_ARCH[process.arch] ?? process.arch;
  return { os: "linux", architecture, variant: architecture === "arm64" ? "v8" : null };
}

export function parsePlatform(s: string): PlatformSpec {
  const parts = s.split("/");
  if (parts.length < 2 || parts.length > 3 || parts.some((p) => !/^[a-z0-9._-]+$/.test(p))) {
    throw usageError(`platform "${s}" is not os/arch[/variant]`, "use e.g. linux/amd64 or linux/arm64/v8");
  }
  return { os: parts[0]!, architecture: parts[1]!, variant: parts[2] ?? null };
}

export function formatPlatform(p: { os: string; architecture: string; variant?: string | null }): string {
  return `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}`;
}

/** Does a descriptor's platform satisfy the wanted one? arm64's variant defaults to v8. */
export function platformMatches(have: { os: string; architecture: string; variant?: string | null | undefined }, want: PlatformSpec): boolean {
  if (have.os !== want.os || have.architecture !== want.architecture) return false;
  if (!want.variant) return true;
  const hv = have.variant || (have.architecture === "arm64" ? "v8" : null);
  return hv === want.variant;
}
