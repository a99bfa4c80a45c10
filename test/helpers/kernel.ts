// Every test/vm/*.test.ts calls requireDm() at top level: outside the VM (no device-mapper, not root)
// the file fails loudly instead of skipping. Run VM tests with `bun run test vm` or
// `bun scripts/vm.ts -- bun test test/vm/x.test.ts`.
import { existsSync } from "node:fs";

export function dmAvailable(): { ok: true } | { ok: false; reason: string } {
  if (!existsSync("/dev/mapper/control")) return { ok: false, reason: "/dev/mapper/control is missing (no device-mapper in this kernel)" };
  if (typeof process.getuid === "function" && process.getuid() !== 0) return { ok: false, reason: "not running as root" };
  return { ok: true };
}

export function requireDm(): void {
  const r = dmAvailable();
  if (!r.ok) {
    throw new Error(`${r.reason}: this is a VM test — run it with \`bun run test vm\` or \`bun scripts/vm.ts -- bun test <file>\``);
  }
}
