// Build the start-up bundles (`bun scripts/build.ts`, run by scripts/setup.sh): one file per command
// in .build/, with the manifest lib/cli/start.ts checks before it runs one (see there for why a
// stale bundle can never run).
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { BUNDLE_DIR, type BundleManifest, type InputStamp, manifestPath, REPO_ROOT, stampOf } from "./start.ts";

/** The commands `bun scripts/NAME.ts` starts through lib/cli/start.ts. */
export const BUNDLED_COMMANDS = ["activate", "extract", "gc", "health", "list", "prune", "release", "remove", "serve", "unpack"] as const;

export interface BuiltBundle {
  name: string;
  bytes: number;
  inputs: number;
  ms: number;
}

function entrySource(name: string): string {
  return `export { default as command } from "../../lib/cli/commands/${name}.ts";\nexport { runMain } from "../../lib/cli/main.ts";\n`;
}

/** Build one command's bundle; the manifest is written last (atomically), and only when no input
 * changed while the build read it — otherwise the previous manifest stays (or none: the sources run). */
export async function buildBundle(name: string): Promise<BuiltBundle> {
  const t0 = Date.now();
  const srcDir = join(BUNDLE_DIR, "src");
  mkdirSync(srcDir, { recursive: true });
  const entry = join(srcDir, `${name}.ts`);
  // rewritten only when it differs: it is an input too, and a fresh ctime would look like an edit
  if ((existsSync(entry) ? readFileSync(entry, "utf8") : "") !== entrySource(name)) {
    writeFileSync(entry, entrySource(name));
    await Bun.sleep(40); // its ctime must fall before the build's start, margin included
  }
  // a ctime is stamped from the kernel's coarse clock, a tick behind Date.now(): a margin
  const startedMs = Date.now() - 20;
  const r = await Bun.build({
    entrypoints: [entry],
    target: "bun",
    format: "esm",
    metafile: true,
    minify: { whitespace: true, syntax: true },
    naming: `${name}.[hash].js`,
    outdir: BUNDLE_DIR,
  });
  if (!r.success || !r.metafile) throw new Error(`bun build ${name}: ${r.logs.map(String).join("; ")}`);
  const out = r.outputs[0]!;
  const inputs: InputStamp[] = [];
  for (const key of Object.keys(r.metafile.inputs)) {
    const rel = relative(REPO_ROOT, resolve(process.cwd(), key));
    const stamp = stampOf(rel);
    if (!stamp) throw new Error(`bun build ${name}: input ${key} not found after the build`);
    // changed while (or after) the bundler read it: this bundle may hold older code than the file
    if (stamp[3] >= startedMs || stamp[4] >= startedMs) throw new Error(`bun build ${name}: ${rel} changed during the build; run it again`);
    inputs.push(stamp);
  }
  const manifest: BundleManifest = { bun: Bun.version, bundle: relative(BUNDLE_DIR, out.path), inputs };
  const tmp = `${manifestPath(name)}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(manifest));
  renameSync(tmp, manifestPath(name));
  removeOldBundles(name, manifest.bundle);
  return { name, bytes: statSync(out.path).size, inputs: inputs.length, ms: Date.now() - t0 };
}

/** Earlier builds of `name`: kept a minute, for a process that read the old manifest just now. */
function removeOldBundles(name: string, keep: string): void {
  for (const f of readdirSync(BUNDLE_DIR)) {
    if (!f.startsWith(`${name}.`) || !f.endsWith(".js") || f === keep) continue;
    const p = join(BUNDLE_DIR, f);
    if (Date.now() - statSync(p).mtimeMs > 60_000) rmSync(p, { force: true });
  }
}
