// bun scripts/list.ts — images, layers (and how many images share each), snapshots, pool use.
import { start } from "../lib/cli/start.ts";

await start("list");
