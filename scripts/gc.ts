// bun scripts/gc.ts [--force] [--json] [--grace 10m] [--wait 30s] [--timeout 10s] [--ignore-lock] [--pool P] [--state-dir D]
// Find devices and thin ids that thinimg leaked (fail-dumb error paths, crashes, released snapshots,
// hand-made ids) and, with --force, remove them one bounded step at a time. Dry-run by default.
// Exit 0: all done (or, dry-run, nothing needs a human); 1: something failed or needs a human.
import { start } from "../lib/cli/start.ts";

await start("gc");
