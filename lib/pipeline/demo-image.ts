// Generated demo/benchmark images: two "layer families" that share their first three layers (like the
// golang/node/python families), built with GNU tar from staging directories. Deterministic (fixed
// mtimes, owners, sort order, seeded content), so shared layers are byte-identical → same digests →
// same chain ids → the second image reuses the first one's devices.
import { chmodSync, linkSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { runOk } from "../exec.ts";

type Entry =
  | { kind: "file"; path: string; size?: number; text?: string; mode?: number }
  | { kind: "dir"; path: string; mode?: number }
  | { kind: "symlink"; path: string; target: string }
  | { kind: "hardlink"; path: string; target: string }
  | { kind: "whiteout"; path: string }
  | { kind: "opaque"; dir: string };

/** xorshift32: deterministic bytes for file content. */
function bytes(seed: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function hashSeed(s: string): number {
  let h = 2166136261;
  for (const c of s) h = Math.imul(h ^ c.charCodeAt(0), 16777619);
  return h >>> 0;
}

function stage(dir: string, entries: Entry[]): void {
  for (const e of entries) {
    const p = join(dir, e.kind === "opaque" ? join(e.dir, ".wh..wh..opq") : e.path);
    mkdirSync(dirname(p), { recursive: true });
    switch (e.kind) {
      case "dir":
        mkdirSync(p, { recursive: true });
        chmodSync(p, e.mode ?? 0o755);
        break;
      case "file":
        writeFileSync(p, e.text ?? bytes(hashSeed(e.path), e.size ?? 1024));
        chmodSync(p, e.mode ?? 0o644);
        break;
      case "symlink":
        symlinkSync(e.target, p);
        break;
      case "hardlink":
        linkSync(join(dir, e.target), p);
        break;
      case "whiteout": {
        const w = join(dir, dirname(e.path), `.wh.${e.path.split("/").at(-1)}`);
        mkdirSync(dirname(w), { recursive: true });
        writeFileSync(w, "");
        break;
      }
      case "opaque":
        writeFileSync(p, "");
        break;
    }
  }
}

async function tarDir(src: string, out: string): Promise<void> {
  await runOk(["tar", "-C", src, "--sort=name", "--mtime=@1700000000", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu", "-cf", out, "."], {
    timeoutMs: 600_000,
  });
}

function many(prefix: string, n: number, size: number): Entry[] {
  return Array.from({ length: n }, (_, i) => ({ kind: "file" as const, path: `${prefix}/f${String(i).padStart(4, "0")}`, size }));
}

/** Layers 1-3, shared by both families. `scale` multiplies the bulk file sizes (1 → ~6 MB total). */
function sharedLayers(scale: number): Entry[][] {
  return [
    [
      { kind: "dir", path: "bin" },
      { kind: "dir", path: "etc" },
      { kind: "dir", path: "tmp", mode: 0o1777 },
      { kind: "dir", path: "usr/lib" },
      { kind: "symlink", path: "lib", target: "usr/lib" },
      { kind: "file", path: "etc/os-release", text: 'NAME="thinimg demo"\nID=demo\nVERSION_ID=1\n' },
      { kind: "file", path: "etc/passwd", text: "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n" },
      { kind: "file", path: "bin/sh", size: 64 * 1024, mode: 0o755 },
      { kind: "file", path: "usr/lib/libdemo.so.1", size: 2 * 1024 * 1024 * scale },
      { kind: "file", path: "usr/bin/su-demo", size: 4096, mode: 0o4755 },
    ],
    [
      { kind: "file", path: "etc/hostname", text: "demo\n" },
      ...many("usr/share/doc/demo", 200, 2048),
      { kind: "file", path: "usr/lib/libbig.so", size: 3 * 1024 * 1024 * scale },
    ],
    [
      { kind: "whiteout", path: "etc/hostname" },
      { kind: "file", path: "opt/base/VERSION", text: "base 3\n" },
      { kind: "file", path: "bin/sh", size: 64 * 1024, mode: 0o755 },
      { kind: "hardlink", path: "bin/sh-again", target: "bin/sh" },
    ],
  ];
}

function familyLayers(app: string, scale: number): Entry[][] {
  return [
    [
      { kind: "dir", path: `app/${app}` },
      { kind: "file", path: `app/${app}/bin/${app}`, size: 1024 * 1024 * scale, mode: 0o755 },
      { kind: "file", path: `app/${app}/README`, text: `${app} says hello\n` },
      { kind: "symlink", path: `usr/bin/${app}`, target: `/app/${app}/bin/${app}` },
      ...many(`app/${app}/lib`, 50, 4096),
    ],
    [
      { kind: "opaque", dir: `app/${app}/lib` },
      { kind: "file", path: `app/${app}/lib/only-this`, text: "after opaque\n" },
      { kind: "file", path: `app/${app}/config.json`, text: JSON.stringify({ app, port: 8080 }) },
    ],
  ];
}

export interface DemoImages {
  /** Layer family directories (1.tar … 5.tar). */
  families: { name: string; dir: string }[];
  /** Total tar bytes per family. */
  bytes: number[];
}

/** Write two 5-layer families sharing layers 1-3 under `root`. */
export async function writeDemoImages(root: string, o: { scale?: number; apps?: string[] } = {}): Promise<DemoImages> {
  const scale = o.scale ?? 1;
  const apps = o.apps ?? ["alpha", "beta"];
  rmSync(root, { recursive: true, force: true });
  const shared = sharedLayers(scale);
  const families: DemoImages["families"] = [];
  const sizes: number[] = [];
  for (const app of apps) {
    const dir = join(root, app);
    mkdirSync(dir, { recursive: true });
    let total = 0;
    const layers = [...shared, ...familyLayers(app, scale)];
    for (const [i, entries] of layers.entries()) {
      const st = join(root, ".stage", `${app}-${i + 1}`);
      mkdirSync(st, { recursive: true });
      stage(st, entries);
      const out = join(dir, `${i + 1}.tar`);
      await tarDir(st, out);
      total += Bun.file(out).size;
    }
    families.push({ name: app, dir });
    sizes.push(total);
  }
  rmSync(join(root, ".stage"), { recursive: true, force: true });
  return { families, bytes: sizes };
}
