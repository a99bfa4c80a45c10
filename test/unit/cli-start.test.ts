// The start-up bundles: a bundle runs only while its manifest matches every input on disk.
import { afterAll, describe, expect, test } from "bun:test";
import { readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildBundle } from "../../lib/cli/bundle.ts";
import { BUNDLE_DIR, type BundleManifest, freshBundle, manifestPath, stampOf } from "../../lib/cli/start.ts";
import { THINIMG_VERSION } from "../../lib/version.ts";

const PROBE = `probe-${process.pid}`;
afterAll(() => rmSync(manifestPath(PROBE), { force: true }));

function manifest(m: Partial<BundleManifest>): void {
  writeFileSync(manifestPath(PROBE), JSON.stringify({ bun: Bun.version, bundle: "probe.js", inputs: [stampOf("package.json")], ...m }));
}

describe("start-up bundles", () => {
  test("a manifest whose every input matches names its bundle; any difference, none", () => {
    expect(freshBundle(PROBE)).toBeNull(); // no manifest
    manifest({});
    expect(freshBundle(PROBE)).toBe(join(BUNDLE_DIR, "probe.js"));
    const s = stampOf("package.json")!;
    for (const changed of [
      { inputs: [[s[0], s[1] + 1, s[2], s[3], s[4]]] }, // size
      { inputs: [[s[0], s[1], s[2] + 1, s[3], s[4]]] }, // inode (replaced by a rename)
      { inputs: [[s[0], s[1], s[2], s[3], s[4] - 1]] }, // ctime (written in place)
      { inputs: [["lib/no-such-file.ts", 1, 1, 1, 1]] }, // an input gone
      { inputs: [] },
      { bun: "0.0.1" },
    ] as Partial<BundleManifest>[]) {
      manifest(changed);
      expect(freshBundle(PROBE)).toBeNull();
    }
    manifest({});
    process.env.THINIMG_NO_BUNDLE = "1";
    try {
      expect(freshBundle(PROBE)).toBeNull();
    } finally {
      delete process.env.THINIMG_NO_BUNDLE;
    }
  });

  test("a built bundle is fresh and runs the command; the sources run the same command", async () => {
    const b = await buildBundle("remove");
    expect(b.inputs).toBeGreaterThan(10);
    const bundle = freshBundle("remove");
    expect(bundle).not.toBeNull();
    // CommonJS with its bytecode cache beside it, which bun's loader reads instead of parsing
    expect(readFileSync(bundle!, "utf8").split("\n")[0]).toBe("// @bun @bytecode @bun-cjs");
    expect(statSync(`${bundle}.jsc`).size).toBeGreaterThan(1000);
    for (const env of [{}, { THINIMG_NO_BUNDLE: "1" }]) {
      const p = Bun.spawnSync(["bun", "scripts/remove.ts", "--version"], { cwd: join(import.meta.dir, "../.."), env: { ...process.env, ...env } });
      expect(p.stdout.toString()).toBe(`thinimg ${THINIMG_VERSION}\n`);
      expect(p.exitCode).toBe(0);
    }
  });
});
