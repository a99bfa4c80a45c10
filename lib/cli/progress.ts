// Progress on a TTY: one redrawn line on stderr ("[2/5] apply sha256:ab12… 41% 120 MiB"). Off a TTY
// (or with --json / --log-format json) nothing is drawn; the log lines carry the story instead.
import type { Progress } from "../pool/context.ts";
import { formatBytes } from "../util/units.ts";

export const noProgress: Progress = { stage() {}, bytes() {}, done() {} };

export function ttyProgress(stream: NodeJS.WriteStream = process.stderr): Progress {
  if (!stream.isTTY) return noProgress;
  let label = "";
  let last = 0;
  const draw = (text: string) => {
    const width = Math.max(20, (stream.columns ?? 80) - 1);
    stream.write(`\r\x1b[2K${text.slice(0, width)}`);
  };
  return {
    stage(l) {
      label = l;
      draw(label);
    },
    bytes(done, total) {
      const t = Date.now();
      if (t - last < 100 && (total === null || done < total)) return;
      last = t;
      if (total && total > 0) {
        const pct = Math.min(100, Math.floor((done / total) * 100));
        const w = 20;
        const fill = Math.round((pct / 100) * w);
        draw(`${label} [${"#".repeat(fill)}${"-".repeat(w - fill)}] ${pct}% ${formatBytes(done)}/${formatBytes(total)}`);
      } else draw(`${label} ${formatBytes(done)}`);
    },
    done() {
      stream.write("\r\x1b[2K");
    },
  };
}
