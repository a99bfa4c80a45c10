// How `bun scripts/X.ts` starts: from the bundle `bun scripts/build.ts` made of the command (one
// file instead of ~100 modules, each a transpile and several file reads — what dominates start-up in
// a VM on a slow filesystem), but only while the bundle is provably built from the sources as they
// are now; otherwise from the sources. This module owns the bundle manifest format (written by
// lib/cli/bundle.ts) and must stay tiny: it imports node built-ins only, since it runs before any
// fast path.
//
// Freshness: the manifest lists every input of the bundle (ours and node_modules) with its size,
// inode, mtime and ctime, recorded after a build that saw no input change while it ran. Any
// edit, checkout, `bun install` or rename changes ctime (which user space cannot set back), so one
// stat per input — no reads, no hashing — proves the bundle current. Times are compared in whole
// seconds, because the test VM's hostfs reports no finer; the build makes sure every recorded
// ctime falls in an earlier second than the build's start, so any later change shows. A missing input, a different bun
// or any mismatch runs the sources instead, silently: a stale bundle is only slower, never wrong.
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";

export const REPO_ROOT = join(import.meta.dir, "../..");
export const BUNDLE_DIR = join(REPO_ROOT, ".build");

/** One input: repo-relative path, size, inode, mtime and ctime (whole seconds). */
export type InputStamp = [path: string, size: number, ino: number, mtimeS: number, ctimeS: number];

export interface BundleManifest {
  bun: string;
  /** The bundle file, relative to BUNDLE_DIR (its name carries a content hash). */
  bundle: string;
  inputs: InputStamp[];
}

export function manifestPath(name: string): string {
  return join(BUNDLE_DIR, `${name}.manifest.json`);
}

export function stampOf(relPath: string): InputStamp | null {
  const st = statSync(join(REPO_ROOT, relPath), { throwIfNoEntry: false });
  return st ? [relPath, st.size, st.ino, Math.floor(st.mtimeMs / 1000), Math.floor(st.ctimeMs / 1000)] : null;
}

/** The bundle's path when its manifest proves it was built from the sources as they are now. */
export function freshBundle(name: string): string | null {
  if (process.env.THINIMG_NO_BUNDLE === "1") return null;
  let m: BundleManifest;
  try {
    m = JSON.parse(readFileSync(manifestPath(name), "utf8")) as BundleManifest;
  } catch {
    return null; // never built (or unreadable): the sources
  }
  if (m.bun !== Bun.version || !Array.isArray(m.inputs) || m.inputs.length === 0) return null;
  for (const want of m.inputs) {
    const have = stampOf(want[0]);
    if (!have || have.some((v, i) => v !== want[i])) return null;
  }
  return join(BUNDLE_DIR, m.bundle);
}

interface CommandModule {
  // biome-ignore lint/suspicious/noExplicitAny: a citty command of any argument shape
  command: any;
  runMain: (cmd: never) => Promise<never>;
}

/** Run the command `name` (lib/cli/commands/NAME.ts): from its bundle when fresh, else the sources. */
export async function start(name: string): Promise<never> {
  const bundle = freshBundle(name);
  let m: CommandModule | null = null;
  if (bundle) {
    try {
      // require, not import(): the bundle is CommonJS (for its bytecode cache) and loads synchronously
      m = require(bundle) as CommandModule;
    } catch {
      m = null; // replaced by a concurrent build between the check and the load: the sources
    }
  }
  if (!m) {
    const [cmd, main] = await Promise.all([import(`./commands/${name}.ts`), import("./main.ts")]);
    m = { command: cmd.default, runMain: main.runMain };
  }
  return m.runMain(m.command as never);
}
