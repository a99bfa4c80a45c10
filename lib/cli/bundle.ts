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

/** Build one command's bundle; the manifest is written last (atomically). An input changed in the
 * second the build started (or later) could change again unseen at whole-second resolution: then
 * the build waits for the next second and runs again; an input still changing fails it. */
export async function buildBundle(name: string): Promise<BuiltBundle> {
  const t0 = Date.now();
  for (let attempt = 0; ; attempt++) {
    const r = await buildOnce(name);
    if (r.built) return { ...r.built, ms: Date.now() - t0 };
    if (attempt === 1) throw new Error(`bun build ${name}: ${r.changed} keeps changing during the build; run it again`);
    await Bun.sleep(1000 - (Date.now() % 1000) + 20);
  }
}

async function buildOnce(name: string): Promise<{ built?: Omit<BuiltBundle, "ms">; changed?: string }> {
  const srcDir = join(BUNDLE_DIR, "src");
  mkdirSync(srcDir, { recursive: true });
  const entry = join(srcDir, `${name}.ts`);
  // rewritten only when it differs: it is an input too
  if ((existsSync(entry) ? readFileSync(entry, "utf8") : "") !== entrySource(name)) writeFileSync(entry, entrySource(name));
  const startedS = Math.floor(Date.now() / 1000);
  // CommonJS with a bytecode cache (X.<hash>.js.jsc beside it, read by bun's loader instead of
  // parsing the bundle): bun makes bytecode for non-compiled output in CommonJS only
  const r = await Bun.build({
    entrypoints: [entry],
    target: "bun",
    format: "cjs",
    bytecode: true,
    metafile: true,
    minify: { whitespace: true, syntax: true },
    naming: `${name}.[hash].js`,
    outdir: BUNDLE_DIR,
  });
  if (!r.success || !r.metafile) throw new Error(`bun build ${name}: ${r.logs.map(String).join("; ")}`);
  const out = r.outputs.find((o) => o.kind === "entry-point")!;
  const inputs: InputStamp[] = [];
  for (const key of Object.keys(r.metafile.inputs)) {
    const rel = relative(REPO_ROOT, resolve(process.cwd(), key));
    const stamp = stampOf(rel);
    if (!stamp) throw new Error(`bun build ${name}: input ${key} not found after the build`);
    // changed in the build's first second or later: the bundle may hold other bytes than the file
    if (stamp[3] >= startedS || stamp[4] >= startedS) return { changed: rel };
    inputs.push(stamp);
  }
  const manifest: BundleManifest = { bun: Bun.version, bundle: relative(BUNDLE_DIR, out.path), inputs };
  const tmp = `${manifestPath(name)}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(manifest));
  renameSync(tmp, manifestPath(name));
  removeOldBundles(name, manifest.bundle);
  return { built: { name, bytes: statSync(out.path).size, inputs: inputs.length } };
}

/** Earlier builds of `name`: kept a minute, for a process that read the old manifest just now. */
function removeOldBundles(name: string, keep: string): void {
  for (const f of readdirSync(BUNDLE_DIR)) {
    if (!f.startsWith(`${name}.`) || !(f.endsWith(".js") || f.endsWith(".js.jsc")) || f === keep || f === `${keep}.jsc`) continue;
    const p = join(BUNDLE_DIR, f);
    if (Date.now() - statSync(p).mtimeMs > 60_000) rmSync(p, { force: true });
  }
}
