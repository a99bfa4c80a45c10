// bun scripts/activate.ts IMAGE [--size 20G] — a fresh thin snapshot of the image's top layer; prints its device path.
// bun scripts/activate.ts --snapshot ID|NAME — load an existing (handed-out) snapshot's device again
// after a reboot: same name, same thin id, same size, same data.
import { start } from "../lib/cli/start.ts";

await start("activate");
