// Progress on a TTY: one redrawn line on stderr
//   "[2/5] apply sha256:ab12… [########------------] 41% 120 MiB/290 MiB  48 MiB/s  4s left"
// Off a TTY (or with --json / --log-format json) nothing is drawn; the log lines carry the story instead.
import type { Progress } from "../pool/context.ts";
import { formatBytes } from "../util/units.ts";

export const noProgress: Progress = { stage() {}, bytes() {}, done() {} };

/** Below this a line is not worth reading; a terminal reporting 0 (or no) columns gets 80. */
export const MIN_WIDTH = 60;
const DEFAULT_COLUMNS = 80;
const BAR = 20;

export function lineWidth(columns: number | undefined): number {
  return Math.max(MIN_WIDTH, (columns || DEFAULT_COLUMNS) - 1);
}

export function formatEta(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  const s = Math.ceil(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** The line for `done` of `total` bytes (total unknown: null) at `rate` bytes/s (null: not yet known). */
export function progressLine(label: string, done: number, total: number | null, rate: number | null): string {
  const speed = rate !== null && rate > 0 ? `  ${formatBytes(rate)}/s` : "";
  if (!total || total <= 0) return `${label} ${formatBytes(done)}${speed}`;
  const pct = Math.min(100, Math.floor((done / total) * 100));
  const fill = Math.round((pct / 100) * BAR);
  const eta = rate !== null && rate > 0 && done < total ? formatEta((total - done) / rate) : "";
  return `${label} [${"#".repeat(fill)}${"-".repeat(BAR - fill)}] ${pct}% ${formatBytes(done)}/${formatBytes(total)}${speed}${eta ? `  ${eta} left` : ""}`;
}

/** Bytes per second over the last few seconds (a window, so a stall shows as a falling rate). */
export class RateMeter {
  private samples: [ms: number, bytes: number][] = [];
  constructor(private readonly windowMs = 5_000) {}
  add(ms: number, bytes: number): number | null {
    // one sample per 100 ms is plenty (and keeps the window small at thousands of calls a second)
    if (this.samples.length === 0 || ms - this.samples.at(-1)![0] >= 100) this.samples.push([ms, bytes]);
    while (this.samples.length > 2 && ms - this.samples[1]![0] >= this.windowMs) this.samples.shift();
    const [t0, b0] = this.samples[0]!;
    return ms - t0 >= 500 ? ((bytes - b0) * 1000) / (ms - t0) : null;
  }
  reset(): void {
    this.samples = [];
  }
}

export function ttyProgress(stream: NodeJS.WriteStream = process.stderr): Progress {
  if (!stream.isTTY) return noProgress;
  let label = "";
  let last = 0;
  const meter = new RateMeter();
  const draw = (text: string) => {
    stream.write(`\r\x1b[2K${text.slice(0, lineWidth(stream.columns))}`);
  };
  return {
    stage(l) {
      label = l;
      meter.reset();
      draw(label);
    },
    bytes(done, total) {
      const t = Date.now();
      const rate = meter.add(t, done);
      if (t - last < 100 && (total === null || done < total)) return;
      last = t;
      draw(progressLine(label, done, total, rate));
    },
    done() {
      stream.write("\r\x1b[2K");
    },
  };
}
