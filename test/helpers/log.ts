// Capture log.warn lines for a while (a test asserts what an operator is told).
import { log } from "../../lib/log.ts";

export function captureWarnings(): { lines: string[]; stop(): void } {
  const lines: string[] = [];
  const orig = log.warn.bind(log);
  log.warn = ((...a: unknown[]) => {
    lines.push(a.map(String).join(" "));
  }) as typeof log.warn;
  return {
    lines,
    stop: () => {
      log.warn = orig;
    },
  };
}
