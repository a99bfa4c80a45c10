// bun scripts/build.ts [NAME…] — (re)build the start-up bundles of the commands (all by default) into
// .build/. scripts/setup.sh runs it; `bun scripts/X.ts` uses a bundle only while it is current.
import { defineCommand } from "citty";
import { BUNDLED_COMMANDS, buildBundle } from "../lib/cli/bundle.ts";
import { runMain } from "../lib/cli/main.ts";
import { usageError } from "../lib/errors.ts";

export const buildCommand = defineCommand({
  meta: { name: "build", description: "Build the start-up bundle of each command (all by default) into .build/; a stale bundle is never used" },
  args: {
    names: { type: "positional", description: `Commands to build (${BUNDLED_COMMANDS.join(", ")})`, required: false },
  },
  async run({ args }) {
    const names = args._.length ? args._ : [...BUNDLED_COMMANDS];
    for (const n of names)
      if (!(BUNDLED_COMMANDS as readonly string[]).includes(n)) throw usageError(`no command ${JSON.stringify(n)}`, `one of: ${BUNDLED_COMMANDS.join(", ")}`);
    const built = await Promise.all(names.map(buildBundle));
    const kib = built.reduce((a, b) => a + b.bytes, 0) / 1024;
    process.stderr.write(
      `build: ${built.length} start-up bundle(s) in .build/ (${kib.toFixed(0)} KiB): ${built.map((b) => `${b.name} ${b.inputs} files`).join(", ")}\n`,
    );
  },
});

if (import.meta.main) await runMain(buildCommand);
