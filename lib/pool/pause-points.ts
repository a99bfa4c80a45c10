// Test-only: THINIMG_TEST_PAUSE_AT=<step>[#n] makes the process stop at the n-th (default first)
// time it reaches the named step boundary: it writes "<step> <pid>" to THINIMG_TEST_PAUSE_FILE
// (default <stateDir>/paused-at) and then either sleeps until killed (crash tests kill -9 it there)
// or, when THINIMG_TEST_PAUSE_CONTINUE names a file, waits for that file to appear, deletes it and
// carries on (fault tests change the device under it meanwhile).
import { existsSync, renameSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const counts = new Map<string, number>();

export async function pausePoint(step: string, stateDir: string): Promise<void> {
  const want = process.env.THINIMG_TEST_PAUSE_AT;
  if (!want) return;
  const [name, nth] = want.split("#");
  if (name !== step) return;
  const seen = (counts.get(step) ?? 0) + 1;
  counts.set(step, seen);
  if (seen !== Number(nth ?? 1)) return;
  const file = process.env.THINIMG_TEST_PAUSE_FILE ?? join(stateDir, "paused-at");
  // tmp + rename: whoever polls for the file never reads it half-written
  writeFileSync(`${file}.tmp`, `${step} ${process.pid}\n`);
  renameSync(`${file}.tmp`, file);
  process.stderr.write(`test hook: paused at ${step} (pid ${process.pid})\n`);
  const cont = process.env.THINIMG_TEST_PAUSE_CONTINUE;
  for (;;) {
    if (cont && existsSync(cont)) {
      unlinkSync(cont);
      return;
    }
    await Bun.sleep(cont ? 50 : 60_000);
  }
}

/** Forget which pause points were already passed (in-process tests run several pipelines). */
export function resetPausePoints(): void {
  counts.clear();
}
