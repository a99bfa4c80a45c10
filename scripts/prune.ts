// bun scripts/prune.ts [--unused-for 7d] [--keep-last N] [--dry-run] [--json] — remove the images no
// snapshot uses that were not used for a while (last activation, or unpack), keeping the newest N of
// each name group; prints what goes and the pool space `bun scripts/gc.ts --force` then frees.
import { start } from "../lib/cli/start.ts";

await start("prune");
