import { defineCommand } from "citty";
import { printJson, runMain } from "../../lib/cli/main.ts";

// A command whose --json output is far larger than a pipe buffer (cli-main.test.ts).
const cmd = defineCommand({
  args: {},
  run() {
    printJson({ items: Array.from({ length: 20000 }, (_, i) => ({ i, s: "x".repeat(20) })) });
  },
});
await runMain(cmd);
