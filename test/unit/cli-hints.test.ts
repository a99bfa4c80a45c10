// Every `--flag` a message or hint names exists on the command that can print it: for each command,
// every file it can load (its static import graph) is searched for flags in string literals; a flag
// written after `scripts/X.ts` belongs to command X, one after an external tool's name (dmsetup,
// mkfs…) to that tool, any other to every command that loads the file.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import type { ArgsDef, CommandDef } from "citty";

const ROOT = join(import.meta.dir, "../..");
const transpiler = new Bun.Transpiler({ loader: "ts" });

async function commands(): Promise<Map<string, { file: string; cmd: CommandDef<ArgsDef> }>> {
  const out = new Map<string, { file: string; cmd: CommandDef<ArgsDef> }>();
  for (const f of readdirSync(join(ROOT, "lib/cli/commands"))) {
    const file = join(ROOT, "lib/cli/commands", f);
    out.set(f.replace(/\.ts$/, ""), { file, cmd: (await import(file)).default });
  }
  out.set("recover-pool", { file: join(ROOT, "ops/recover-pool.ts"), cmd: (await import(join(ROOT, "ops/recover-pool.ts"))).cmd });
  for (const [name, exp] of [
    ["vm", "vmCommand"],
    ["test", "testCommand"],
    ["build", "buildCommand"],
  ] as const)
    out.set(name, { file: join(ROOT, `scripts/${name}.ts`), cmd: (await import(join(ROOT, `scripts/${name}.ts`)))[exp] });
  return out;
}

async function flagsOf(cmd: CommandDef<ArgsDef>): Promise<Set<string>> {
  const args = ((typeof cmd.args === "function" ? await cmd.args() : await cmd.args) ?? {}) as ArgsDef;
  const flags = new Set(["help", "version"]);
  for (const [name, def] of Object.entries(args)) {
    if (def.type === "positional") continue;
    const alias = "alias" in def ? def.alias : undefined;
    for (const n of [name, ...(Array.isArray(alias) ? alias : alias ? [alias] : [])]) {
      flags.add(n);
      if (def.type === "boolean") flags.add(`no-${n}`);
    }
  }
  return flags;
}

/** The files a module loads, itself included (static imports, and dynamic ones with a literal path). */
function graph(entry: string, seen = new Set<string>()): Set<string> {
  if (seen.has(entry)) return seen;
  seen.add(entry);
  for (const imp of transpiler.scanImports(readFileSync(entry, "utf8"))) {
    if (imp.path.startsWith(".") && imp.path.endsWith(".ts")) graph(resolve(dirname(entry), imp.path), seen);
  }
  return seen;
}

// After one of these words a flag is that tool's, not ours.
const TOOL =
  /\b(dmsetup|mkfs(?:\.ext4)?|tar|umoci|skopeo|e2fsck|resize2fs|losetup|thin_\w+|bun (?:test|build|install|run)|blkdiscard|mount|curl|linux\.uml|setpriv|apt-get)\b/g;
// `bun scripts/gc.ts --force`, or in prose `gc --force`
const SCRIPT = /\b(?:scripts|ops)\/([\w-]+)\.ts\b|\b(activate|extract|gc|health|list|prune|release|remove|serve|unpack|recover-pool)(?= --)/g;

/** serve runs unpack, prune, activate and release for its callers: their messages (which name those
 * commands' flags) reach its HTTP answers and log. */
const ALSO: Record<string, string[]> = { serve: ["unpack", "prune", "activate", "release"] };

/** Flags in text that is not a hint of ours: [file, flag, why]. */
const NOT_OURS: [string, string, string][] = [
  ["lib/recover/repair.ts", "transaction-id", "thin_repair's fields, printed after its command line"],
  ["lib/recover/repair.ts", "data-block-size", "thin_repair's fields, printed after its command line"],
  ["lib/recover/repair.ts", "nr-data-blocks", "thin_repair's fields, printed after its command line"],
  ["lib/recover/grow.ts", "table", "dmsetup reload's argument in a nested template (the literal scan splits it)"],
  ["lib/lock/holders.ts", "ignore-lock", "the warning printed only when the command was given --ignore-lock"],
];

/** Flags named in the string literals of a file: [flag, command it belongs to (null: the loader's)]. */
function mentions(file: string): [string, string | null][] {
  const js = transpiler.transformSync(readFileSync(file, "utf8")); // no comments, no types
  const out: [string, string | null][] = [];
  for (const lit of js.match(/"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`/g) ?? []) {
    const text = lit.slice(1, -1);
    if (/^--[\w-]+(=.*)?$/.test(text)) continue; // one argv word for an external command
    const marks: { at: number; owner: string | null | "tool" }[] = [];
    for (const m of text.matchAll(SCRIPT)) marks.push({ at: m.index, owner: (m[1] ?? m[2])! });
    for (const m of text.matchAll(TOOL)) marks.push({ at: m.index, owner: "tool" });
    for (const m of text.matchAll(/(?<![\w-])--([a-z][\w-]*[a-z0-9])(?![\w-])/g)) {
      const before = marks.filter((k) => k.at < m.index).sort((a, b) => b.at - a.at)[0];
      if (before?.owner === "tool") continue;
      out.push([m[1]!, before ? before.owner : null]);
    }
  }
  return out;
}

describe("hints and messages name only flags that exist", () => {
  test("every --flag in lib/, scripts/ and ops/ strings exists on each command that can print it", async () => {
    const cmds = await commands();
    const flags = new Map<string, Set<string>>();
    for (const [name, c] of cmds) flags.set(name, await flagsOf(c.cmd));
    for (const [name, others] of Object.entries(ALSO)) for (const o of others) for (const f of flags.get(o)!) flags.get(name)!.add(f);
    const wrong: string[] = [];
    for (const [name, c] of cmds) {
      for (const file of graph(c.file)) {
        for (const [flag, owner] of mentions(file)) {
          const target = owner ?? name;
          const known = flags.get(target);
          if (!known) continue; // a script that is not a command (demo, benchmarks)
          if (NOT_OURS.some(([f, fl]) => f === relative(ROOT, file) && fl === flag)) continue;
          if (!known.has(flag)) wrong.push(`${relative(ROOT, file)}: --${flag} (${target}${owner ? "" : `, loaded by ${name}`})`);
        }
      }
    }
    expect([...new Set(wrong)].sort()).toEqual([]);
  });

  test("the checker sees a wrong flag, attributes a flag after scripts/X.ts to X and skips a tool's", () => {
    const dir = mkdtempSync(join(tmpdir(), "thinimg-hints-"));
    const file = join(dir, "probe.ts");
    writeFileSync(file, `export const h = "raise --max-bytes; or run bun scripts/gc.ts --force, then dmsetup --noudevsync ls";\n`);
    try {
      expect(mentions(file)).toEqual([
        ["max-bytes", null],
        ["force", "gc"],
      ]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
