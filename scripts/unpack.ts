// bun scripts/unpack.ts SOURCE [--name NAME] — turn an image into thin devices (one per layer,
// shared between images). Re-running for an unpacked image does no device work.
import { start } from "../lib/cli/start.ts";

await start("unpack");
