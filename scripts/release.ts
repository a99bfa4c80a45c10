// bun scripts/release.ts SNAPSHOT — deactivate a snapshot and mark it released (GC deletes its thin id).
import { start } from "../lib/cli/start.ts";

await start("release");
