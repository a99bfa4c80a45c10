// bun scripts/remove.ts IMAGE… — remove images: gone from `list`; the layers no other image uses are
// released and `bun scripts/gc.ts --force` deletes their thin ids. Active snapshots keep working.
import { start } from "../lib/cli/start.ts";

await start("remove");
