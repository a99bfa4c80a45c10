// Formats from local sources: layer families, docker-archives, OCI layouts (dir and tar), single
// rootfs tarballs — detection by content, selection, and every verification (digests, diff_ids,
// sizes, paths that must stay inside the archive).
import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ThinimgError } from "../../lib/errors.ts";
import { orderLayerFamily } from "../../lib/image/format/layer-family.ts";
import { resolveImage } from "../../lib/image/resolve.ts";
import type { LayerRef, ResolveOptions } from "../../lib/image/types.ts";
import {
  type ArchiveMember,
  buildLayerTar,
  buildTar,
  compress,
  OciLayout,
  sampleLayer,
  sha256,
  withRef,
  writeDockerArchive,
  writeLayerFamily,
  writeOciLayout,
} from "../helpers/images.ts";

const root = mkdtempSync("/tmp/thinimg-formats-test-");
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const tmp = (name: string) => join(root, `${++n}-${name}`);
const opts = (o: Partial<ResolveOptions> = {}): ResolveOptions => ({ stateDir: join(root, "state"), ...o });

async function readLayer(l: LayerRef): Promise<Buffer> {
  return Buffer.from(await new Response(await l.open()).arrayBuffer());
}

async function readError(l: LayerRef): Promise<ThinimgError> {
  try {
    await readLayer(l);
  } catch (e) {
    expect(e).toBeInstanceOf(ThinimgError);
    return e as ThinimgError;
  }
  throw new Error("expected the layer stream to fail");
}

async function resolveError(ref: string, o: Partial<ResolveOptions> = {}): Promise<ThinimgError> {
  try {
    await resolveImage(ref, opts(o));
  } catch (e) {
    if (!(e instanceof ThinimgError)) throw e;
    expect(e.message).not.toContain("\n");
    return e;
  }
  throw new Error(`expected ${ref} to be refused`);
}

const L = [1, 2, 3, 4].map((i) => sampleLayer(i));

describe("layer family ordering", () => {
  test("numeric, not lexical: 10.tar after 9.tar", () => {
    const names = Array.from({ length: 12 }, (_, i) => `${i + 1}.tar`).sort(); // 1,10,11,12,2,…
    const o = orderLayerFamily([...names, "README.md", ".hidden", "SHA256SUMS"], "fam");
    expect(o.layers.map((l) => l.name)).toEqual(Array.from({ length: 12 }, (_, i) => `${i + 1}.tar`));
    expect(o.ignored.sort()).toEqual([".hidden", "README.md", "SHA256SUMS"]);
  });
  test("starting at 0 is accepted", () => {
    expect(orderLayerFamily(["0.tar", "1.tar"], "f").layers.map((l) => l.n)).toEqual([0, 1]);
  });
  test("a gap names the missing layer", () => {
    expect(() => orderLayerFamily(["1.tar", "2.tar", "4.tar"], "fam")).toThrow("fam: layer 3.tar is missing (found 2.tar then 4.tar)");
    expect(() => orderLayerFamily(["2.tar", "3.tar"], "fam")).toThrow("fam: layer 1.tar is missing");
  });
  test("ambiguous names are refused, not guessed", () => {
    expect(() => orderLayerFamily(["1.tar", "base.tar"], "fam")).toThrow('"base.tar" is not a layer name');
    expect(() => orderLayerFamily(["1.tar", "01.tar"], "fam")).toThrow("1.tar and 01.tar both claim layer 1");
    expect(() => orderLayerFamily(["README"], "fam")).toThrow("fam: no layers");
  });
});

describe("layer family directory", () => {
  test("12 layers, mixed plain/gzip/zstd by magic bytes, applied in numeric order", async () => {
    const dir = tmp("fam12");
    const layers = Array.from({ length: 12 }, (_, i) => sampleLayer(i + 1));
    const kinds = ["none", "gzip", "zstd"] as const;
    writeLayerFamily(
      dir,
      layers.map((l, i) => compress(l, kinds[i % 3]!)),
    );
    writeFileSync(join(dir, "README"), "not a layer");
    mkdirSync(join(dir, "13.tar")); // a directory is not a layer: ignored
    const img = await resolveImage(dir, opts());
    expect(img.format).toBe("layer-family");
    expect(img.config).toBeNull();
    expect(img.layers.map((l) => l.label)).toEqual(layers.map((_, i) => `${i + 1}.tar`));
    expect(img.layers.map((l) => l.compression)).toEqual(layers.map((_, i) => kinds[i % 3]!));
    for (const [i, l] of img.layers.entries()) {
      expect(l.digest).toBe(sha256(compress(layers[i]!, kinds[i % 3]!)));
      expect((await readLayer(l)).equals(layers[i]!)).toBe(true);
    }
    // uncompressed: the digest is the diff_id; compressed: unknown without a config
    expect(img.layers[0]!.diffId).toBe(sha256(layers[0]!));
    expect(img.layers[1]!.diffId).toBeNull();
  });

  test("a layer changed after resolve fails its digest check at EOF", async () => {
    const dir = tmp("fam-change");
    writeLayerFamily(dir, [L[0]!, L[1]!]);
    const img = await resolveImage(dir, opts());
    writeFileSync(join(dir, "2.tar"), L[2]!);
    const e = await readError(img.layers[1]!);
    expect(e.message).toMatch(/^layer 2\/2 \(2\.tar\): (digest mismatch|truncated|more bytes)/);
  });

  test("xz layers get a clear refusal", async () => {
    const dir = tmp("fam-xz");
    writeLayerFamily(dir, [Buffer.concat([Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), Buffer.alloc(100)])]);
    expect((await resolveError(dir)).message).toContain("1.tar: xz-compressed; layers must be plain tar, gzip or zstd");
  });

  test("a gap is refused with the missing number", async () => {
    const dir = tmp("fam-gap");
    writeLayerFamily(dir, [L[0]!, L[1]!], ["1.tar", "3.tar"]);
    expect((await resolveError(dir)).message).toContain("layer 2.tar is missing");
  });

  test("an empty directory is not an image", async () => {
    const dir = tmp("empty");
    mkdirSync(dir);
    expect((await resolveError(dir)).message).toContain("no layers (expected 1.tar, 2.tar, …)");
  });
});

describe("docker-archive", () => {
  const twoImages = [
    { tags: ["app:1.0", "app:latest"], layers: [L[0]!, L[1]!], config: { env: ["A=1"], entrypoint: ["/e"], cmd: ["c"], workingDir: "/w", user: "1000:1000" } },
    { tags: ["base:3"], layers: [L[0]!] },
  ];

  for (const style of ["legacy", "blobs"] as const) {
    test(`${style}: several images, selected by tag (SOURCE:TAG, --select, docker shorthand)`, async () => {
      const p = tmp(`multi-${style}.tar`);
      const info = writeDockerArchive(p, twoImages, { style });
      const a = await resolveImage(`${p}:app:1.0`, opts());
      expect(a.format).toBe("docker-archive");
      expect(a.name).toBe("app:1.0");
      expect(a.id).toBe(info.configDigests[0]!);
      expect(a.layers.length).toBe(2);
      expect(a.layers.map((l) => l.diffId)).toEqual(info.diffIds[0]!);
      expect(a.config).toMatchObject({ env: ["A=1"], entrypoint: ["/e"], cmd: ["c"], workingDir: "/w", user: "1000:1000" });
      expect((await readLayer(a.layers[1]!)).equals(L[1]!)).toBe(true);
      const b = await resolveImage(p, opts({ select: "base:3" }));
      expect(b.layers.length).toBe(1);
      expect((await readLayer(b.layers[0]!)).equals(L[0]!)).toBe(true);
      const latest = await resolveImage(`${p}:docker.io/library/app`, opts()); // → app:latest
      expect(latest.id).toBe(info.configDigests[0]!);
    });
  }

  test("without a tag, several images are refused with the list", async () => {
    const p = tmp("multi.tar");
    writeDockerArchive(p, twoImages);
    const e = await resolveError(p);
    expect(e.message).toContain("holds 2 images; choose one");
    expect(e.hint).toContain("app:1.0, app:latest, base:3");
    expect((await resolveError(`${p}:nope`)).message).toContain('no image tagged "nope"');
  });

  test("gzip-compressed archive with gzip layers (docker save | gzip)", async () => {
    const p = tmp("img.tar.gz");
    writeDockerArchive(p, [{ tags: ["x:1"], layers: [compress(L[0]!, "gzip"), L[1]!] }], { gzip: true });
    const img = await resolveImage(p, opts());
    expect(img.layers[0]!.compression).toBe("gzip");
    expect((await readLayer(img.layers[0]!)).equals(L[0]!)).toBe(true);
    expect((await readLayer(img.layers[1]!)).equals(L[1]!)).toBe(true);
  });

  test("a layer whose content does not match its diff_id fails at EOF", async () => {
    const p = tmp("tampered.tar");
    writeDockerArchive(p, [{ tags: ["x:1"], layers: [L[0]!] }], {
      mutate: (files) => {
        const f = files.find((x) => x.name.endsWith("layer.tar"))!;
        f.data = L[3]!; // same size, other content
      },
    });
    const img = await resolveImage(p, opts());
    const e = await readError(img.layers[0]!);
    expect(e.message).toMatch(/^layer 1\/1 \(sha256:[0-9a-f]{12}\): (digest|diff_id) mismatch/);
  });

  test("a config that does not match the digest in its name is refused", async () => {
    const p = tmp("badcfg.tar");
    writeDockerArchive(p, [{ tags: ["x:1"], layers: [L[0]!] }], {
      style: "blobs",
      mutate: (files) => {
        const f = files.find((x) => x.name.startsWith("blobs/") && x.data[0] === 0x7b)!;
        f.data = Buffer.from(Buffer.from(f.data).toString("utf8").replace('"amd64"', '"arm64"'));
      },
    });
    expect((await resolveError(p)).message).toContain("digest mismatch");
  });

  for (const [label, bad] of [
    ["climbing", "../../../../etc/passwd"],
    ["absolute", "/etc/passwd"],
    ["dot-dot inside", "abc/../../x/layer.tar"],
  ] as const) {
    test(`manifest path ${label} is refused`, async () => {
      const p = tmp("trav.tar");
      writeDockerArchive(p, [{ tags: ["x:1"], layers: [L[0]!] }], {
        mutate: (files) => {
          const m = files.find((f) => f.name === "manifest.json")!;
          const doc = JSON.parse(Buffer.from(m.data).toString("utf8"));
          doc[0].Layers[0] = bad;
          m.data = Buffer.from(JSON.stringify(doc));
        },
      });
      const e = await resolveError(p);
      expect(e.message).toContain("leaves the archive");
    });
  }

  test("legacy duplicate layers as in-archive symlinks resolve; links leaving the archive do not", async () => {
    // docker save writes "<id>/layer.tar -> ../<other>/layer.tar" for repeated layers
    const relink = (target: string) => (files: ArchiveMember[]) => {
      const i = files.findIndex((f) => f.name.endsWith("layer.tar"));
      const real = files[i]!;
      files.splice(i, 1, { name: "real/layer.tar", data: real.data }, { name: real.name, data: "", link: target });
    };
    const img = [{ tags: ["x:1"], layers: [L[0]!] }];
    const good = tmp("symlinked.tar");
    writeDockerArchive(good, img, { mutate: relink("../real/layer.tar") });
    const r = await resolveImage(good, opts());
    expect((await readLayer(r.layers[0]!)).equals(L[0]!)).toBe(true);
    const bad = tmp("symlink-out.tar");
    writeDockerArchive(bad, img, { mutate: relink("../../../../etc/passwd") });
    expect((await resolveError(bad)).message).toContain("links outside the archive");
    const abs = tmp("symlink-abs.tar");
    writeDockerArchive(abs, img, { mutate: relink("/etc/passwd") });
    expect((await resolveError(abs)).message).toContain("links outside the archive");
  });

  test("a missing layer member is named", async () => {
    const p = tmp("missing.tar");
    writeDockerArchive(p, [{ tags: ["x:1"], layers: [L[0]!] }], {
      mutate: (files) => {
        files.splice(
          files.findIndex((f) => f.name.endsWith("layer.tar")),
          1,
        );
      },
    });
    expect((await resolveError(p)).message).toMatch(/layer 1\/1: .*layer\.tar is missing from the archive/);
  });
});

describe("OCI layout", () => {
  function multiArch() {
    const layout = new OciLayout();
    const amd = layout.addImage({ layers: [compress(L[0]!, "gzip")], platform: { os: "linux", architecture: "amd64" } });
    const arm = layout.addImage({ layers: [compress(L[1]!, "zstd")], platform: { os: "linux", architecture: "arm64", variant: "v8" } });
    const ppc = layout.addImage({ layers: [L[2]!], platform: { os: "linux", architecture: "ppc64le" } });
    // nested: top index (named) → index → per-platform manifests
    const inner = layout.addIndex([arm.manifest, ppc.manifest, amd.manifest]);
    const outer = layout.addIndex([inner]);
    const single = layout.addImage({ layers: [L[3]!], config: { env: ["X=1"], cmd: ["/bin/true"], user: "nobody" } });
    return { layout, top: [withRef(outer, "multi"), withRef(single.manifest, "v1")], amd, arm, single };
  }

  for (const form of ["dir", "tar"] as const) {
    test(`${form}: nested index + ref.name + host platform (linux/amd64)`, async () => {
      const { layout, top, amd } = multiArch();
      const p = form === "dir" ? layout.writeDir(tmp("oci"), top) : layout.writeTar(tmp("oci.tar"), top);
      const img = await resolveImage(`${p}:multi`, opts());
      expect(img.format).toBe("oci-layout");
      expect(img.name).toBe("multi");
      expect(img.platform).toBe("linux/amd64");
      expect(img.id).toBe(amd.manifest.digest);
      expect(img.layers[0]!.digest).toBe(amd.layers[0]!.digest);
      expect(img.layers[0]!.diffId).toBe(sha256(L[0]!));
      expect((await readLayer(img.layers[0]!)).equals(L[0]!)).toBe(true);
    });
  }

  test("--platform picks another architecture; an absent one lists what exists", async () => {
    const { layout, top, arm } = multiArch();
    const p = layout.writeDir(tmp("oci"), top);
    const img = await resolveImage(`${p}:multi`, opts({ platform: "linux/arm64" }));
    expect(img.id).toBe(arm.manifest.digest);
    expect(img.platform).toBe("linux/arm64/v8");
    expect((await readLayer(img.layers[0]!)).equals(L[1]!)).toBe(true);
    const e = await resolveError(`${p}:multi`, { platform: "linux/s390x" });
    expect(e.message).toContain("no image for platform linux/s390x");
    expect(e.hint).toContain("linux/arm64/v8, linux/ppc64le, linux/amd64");
  });

  test(":REF naming one manifest per platform in index.json is chosen by platform (host by default)", async () => {
    const layout = new OciLayout();
    const amd = layout.addImage({ layers: [L[0]!], platform: { os: "linux", architecture: "amd64" } });
    const arm = layout.addImage({ layers: [L[1]!], platform: { os: "linux", architecture: "arm64" } });
    const other = layout.addImage({ layers: [L[2]!] });
    const p = layout.writeDir(tmp("oci"), [withRef(amd.manifest, "t"), withRef(arm.manifest, "t"), withRef(other.manifest, "u")]);
    const a = await resolveImage(`${p}:t`, opts({ platform: "linux/amd64" }));
    expect(a.id).toBe(amd.manifest.digest);
    expect(a.platform).toBe("linux/amd64");
    expect(a.name).toBe("t");
    expect((await readLayer(a.layers[0]!)).equals(L[0]!)).toBe(true);
    const b = await resolveImage(p, opts({ select: "t", platform: "linux/arm64/v8" }));
    expect(b.id).toBe(arm.manifest.digest);
    expect((await resolveImage(`${p}:t`, opts())).id).toBe(amd.manifest.digest); // this host: linux/amd64
    const e = await resolveError(`${p}:t`, { platform: "linux/s390x" });
    expect(e.message).toContain(`"t": no image for platform linux/s390x`);
    expect(e.hint).toContain("linux/amd64, linux/arm64");
    // two unrelated images with one name and no platform stay ambiguous
    const q = layout.writeDir(tmp("oci"), [
      withRef(other.manifest, "x"),
      withRef(amd.manifest, "x"),
      withRef(layout.addImage({ layers: [L[3]!] }).manifest, "x"),
    ]);
    expect((await resolveError(`${q}:x`)).message).toContain('3 different images are named "x"');
  });

  test("a config without rootfs is accepted (diff_ids then unknown); with rootfs they are verified", async () => {
    const layout = new OciLayout();
    const cfg = Buffer.from(JSON.stringify({ architecture: "amd64", os: "linux", config: { Cmd: ["/bin/sh"] } }));
    const config = layout.addBlob(cfg, "application/vnd.oci.image.config.v1+json");
    const gz = compress(L[0]!, "gzip");
    const layer = layout.addBlob(gz, "application/vnd.oci.image.layer.v1.tar+gzip");
    const doc = { schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json", config, layers: [layer] };
    const manifest = layout.addBlob(Buffer.from(JSON.stringify(doc)), doc.mediaType);
    const p = layout.writeDir(tmp("oci"), [manifest]);
    const img = await resolveImage(p, opts());
    expect(img.config?.diffIds).toBeNull();
    expect(img.config?.cmd).toEqual(["/bin/sh"]);
    expect(img.layers[0]!.diffId).toBeNull();
    expect(img.layers[0]!.digest).toBe(sha256(gz));
    expect((await readLayer(img.layers[0]!)).equals(L[0]!)).toBe(true);
    // the same in a docker-archive; a rootfs with a wrong count is still refused
    const dock = tmp("d");
    mkdirSync(dock);
    writeFileSync(join(dock, "config.json"), cfg);
    writeFileSync(join(dock, "l.tar"), L[0]!);
    writeFileSync(join(dock, "manifest.json"), JSON.stringify([{ Config: "config.json", RepoTags: ["a:1"], Layers: ["l.tar"] }]));
    const d = await resolveImage(dock, opts());
    expect(d.layers[0]!.diffId).toBe(sha256(L[0]!)); // plain layer: its digest is its diff_id
    expect((await readLayer(d.layers[0]!)).equals(L[0]!)).toBe(true);
    const bad = { architecture: "amd64", os: "linux", rootfs: { type: "layers", diff_ids: [] } };
    writeFileSync(join(dock, "config.json"), JSON.stringify(bad));
    expect((await resolveError(dock)).message).toContain("lists 1 layers but the config has 0 diff_ids");
  });

  test("config fields are parsed; several images need a ref", async () => {
    const { layout, top, single } = multiArch();
    const p = layout.writeDir(tmp("oci"), top);
    const img = await resolveImage(p, opts({ select: "v1" }));
    expect(img.id).toBe(single.manifest.digest);
    expect(img.config).toMatchObject({ env: ["X=1"], cmd: ["/bin/true"], user: "nobody", entrypoint: null, os: "linux" });
    const e = await resolveError(p);
    expect(e.message).toContain("holds 2 images; choose one");
    expect(e.hint).toContain("multi, v1");
    expect((await resolveError(`${p}:v2`)).hint).toContain("available: multi, v1");
  });

  test("a tampered layer blob (same size) fails its digest at EOF", async () => {
    const p = tmp("oci");
    const [b] = writeOciLayout(p, [{ layers: [L[0]!] }]);
    writeFileSync(join(p, "blobs/sha256", b!.layers[0]!.digest.slice(7)), L[3]!);
    const img = await resolveImage(p, opts());
    const e = await readError(img.layers[0]!);
    expect(e.message).toContain("digest mismatch");
    expect(e.message).toContain(b!.layers[0]!.digest);
  });

  test("a tampered manifest or config blob is refused at resolve", async () => {
    const p = tmp("oci");
    const [b] = writeOciLayout(p, [{ layers: [L[0]!] }]);
    const cfg = join(p, "blobs/sha256", b!.config.digest.slice(7));
    const text = await Bun.file(cfg).text();
    writeFileSync(cfg, text.replace('"amd64"', '"arm64"'));
    expect((await resolveError(p)).message).toMatch(/config: digest mismatch/);
  });

  test("a blob whose size differs from its descriptor is refused", async () => {
    const p = tmp("oci");
    const [b] = writeOciLayout(p, [{ layers: [L[0]!] }]);
    writeFileSync(join(p, "blobs/sha256", b!.layers[0]!.digest.slice(7)), Buffer.concat([L[0]!, Buffer.alloc(512)]));
    expect((await resolveError(p)).message).toContain(`blob is ${L[0]!.length + 512} bytes, descriptor says ${L[0]!.length}`);
  });

  for (const [label, digest, msg] of [
    ["traversing", "sha256:../../../../etc/passwd", "invalid digest"],
    ["sha512", `sha512:${"ab".repeat(64)}`, 'unsupported digest algorithm "sha512"'],
    ["upper-case hex", `sha256:${"AB".repeat(32)}`, "invalid digest"],
  ] as const) {
    test(`a ${label} digest never becomes a path`, async () => {
      const layout = new OciLayout();
      const img = layout.addImage({ layers: [L[0]!] });
      const p = tmp("oci");
      layout.writeDir(p, [{ ...img.manifest, digest }]);
      const e = await resolveError(p);
      expect(e.message).toContain(msg);
    });
  }

  test("a missing blob and a broken index.json are named", async () => {
    const p = tmp("oci");
    const [b] = writeOciLayout(p, [{ layers: [L[0]!] }]);
    rmSync(join(p, "blobs/sha256", b!.layers[0]!.digest.slice(7)));
    expect((await resolveError(p)).message).toContain("is missing from the layout");
    const q = tmp("oci");
    writeOciLayout(q, [{ layers: [L[0]!] }]);
    writeFileSync(join(q, "index.json"), "{ nope");
    expect((await resolveError(q)).message).toContain("index.json: not valid JSON");
  });

  test("a symlinked blob that leaves the layout directory is refused", async () => {
    const p = tmp("oci");
    const [b] = writeOciLayout(p, [{ layers: [L[0]!] }]);
    const blob = join(p, "blobs/sha256", b!.layers[0]!.digest.slice(7));
    const outside = tmp("outside");
    writeFileSync(outside, L[0]!);
    rmSync(blob);
    symlinkSync(outside, blob);
    expect((await resolveError(p)).message).toContain("resolves outside the directory");
  });
});

describe("single archives", () => {
  test("a rootfs tarball (plain or zstd) is a one-layer image", async () => {
    const p = tmp("rootfs.tar");
    writeFileSync(p, L[0]!);
    const a = await resolveImage(p, opts());
    expect(a.format).toBe("layer-tar");
    expect(a.layers.length).toBe(1);
    expect(a.layers[0]!.digest).toBe(sha256(L[0]!));
    expect((await readLayer(a.layers[0]!)).equals(L[0]!)).toBe(true);
    const z = tmp("rootfs.tar.zst");
    writeFileSync(z, compress(L[1]!, "zstd"));
    const b = await resolveImage(z, opts());
    expect(b.format).toBe("layer-tar");
    expect((await readLayer(b.layers[0]!)).equals(L[1]!)).toBe(true);
  });

  test("garbage, truncated and half-image archives are refused", async () => {
    const g = tmp("garbage");
    writeFileSync(g, Buffer.from("this is not a tar archive at all".repeat(40)));
    expect((await resolveError(g)).message).toContain("not a valid tar archive (bad header checksum at offset 0)");
    const t = tmp("trunc.tar");
    writeFileSync(t, buildTar([{ name: "a", data: "x".repeat(5000) }]).subarray(0, 2048));
    expect((await resolveError(t)).message).toContain("not a valid tar archive");
    const h = tmp("half.tar");
    writeFileSync(
      h,
      buildTar([
        { name: "blobs/sha256/abc", data: "x" },
        { name: "oci-layout", data: "{}" },
      ]),
    );
    expect((await resolveError(h)).message).toContain("but no manifest.json or index.json");
  });

  test("a big rootfs tarball needs no member index; an image archive that big is refused", async () => {
    const entries = Array.from({ length: 4500 }, (_, i) => ({ path: `usr/share/f${i}`, content: "" }));
    const rootfs = buildLayerTar([{ path: "usr/", type: "dir" }, ...entries]);
    const p = tmp("big-rootfs.tar");
    writeFileSync(p, rootfs);
    const img = await resolveImage(p, opts());
    expect(img.layers.length).toBe(1);
    expect(img.layers[0]!.size).toBe(rootfs.length);
    const q = tmp("big-image.tar");
    writeFileSync(q, buildLayerTar([...entries, { path: "manifest.json", content: "[]" }]));
    const e = await resolveError(q);
    expect(e.kind).toBe("policy");
    expect(e.message).toContain("an image archive with thousands of members");
  });

  test("a missing path is one line", async () => {
    const e = await resolveError(join(root, "does-not-exist.tar"));
    expect(e.message).toContain("no such file or directory");
  });
});
