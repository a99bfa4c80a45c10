// Builders for test images, all in memory and fast: layer tars with hand-assembled headers (node-tar's
// Header does the 512-byte encoding; PAX and GNU long-name records are written here so hostile
// variants are easy), layer families, docker-archives (legacy and Docker 25+ "blobs" style) and OCI
// layouts (directory or tar, nested indexes, multi-arch). Reusable by every image/pipeline test.
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { gunzipSync, gzipSync, zstdCompressSync, zstdDecompressSync } from "node:zlib";
import { Header } from "tar";

// ---- tar ----------------------------------------------------------------------------------------

export type EntryType = "file" | "dir" | "symlink" | "hardlink" | "char" | "block" | "fifo";

export interface TarEntry {
  path: string;
  type?: EntryType;
  content?: string | Uint8Array;
  mode?: number;
  uid?: number;
  gid?: number;
  uname?: string;
  gname?: string;
  /** Seconds since the epoch, or a Date. Default 2024-01-01. */
  mtime?: number | Date;
  linkpath?: string;
  devmajor?: number;
  devminor?: number;
  /** SCHILY.xattr.* records (e.g. { "security.capability": bytes }). */
  xattrs?: Record<string, string | Uint8Array>;
  /** Extra raw PAX records. */
  pax?: Record<string, string>;
  /** How to carry a name that does not fit the header: "pax" (default) or GNU "L"/"K" records. */
  longNames?: "pax" | "gnu";
  /** Lie in the header: declared size differs from the content written (hostile tests). */
  declaredSize?: number;
}

const TYPE_NAME: Record<EntryType, string> = {
  file: "File",
  dir: "Directory",
  symlink: "SymbolicLink",
  hardlink: "Link",
  char: "CharacterDevice",
  block: "BlockDevice",
  fifo: "FIFO",
};

const DEFAULT_MTIME = new Date("2024-01-01T00:00:00Z");

const bytes = (c: string | Uint8Array | undefined): Buffer =>
  c === undefined ? Buffer.alloc(0) : typeof c === "string" ? Buffer.from(c, "utf8") : Buffer.from(c);

function pad512(b: Buffer): Buffer {
  const rem = b.length % 512;
  return rem === 0 ? b : Buffer.concat([b, Buffer.alloc(512 - rem)]);
}

function header(h: ConstructorParameters<typeof Header>[0]): Buffer {
  const block = Buffer.alloc(512);
  new Header(h).encode(block, 0);
  return block;
}

/** One PAX record: "<len> key=value\n", where len counts itself. */
function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`), value, Buffer.from("\n")]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len)), body]);
}

function metaEntry(type: string, name: string, body: Buffer, mtime: Date): Buffer {
  return Buffer.concat([header({ path: name, type: type as never, size: body.length, mode: 0o644, mtime, uid: 0, gid: 0 }), pad512(body)]);
}

export function tarEntry(e: TarEntry): Buffer {
  const type = e.type ?? (e.linkpath ? "symlink" : "file");
  const content = type === "file" ? bytes(e.content) : Buffer.alloc(0);
  const mtime = e.mtime instanceof Date ? e.mtime : e.mtime !== undefined ? new Date(e.mtime * 1000) : DEFAULT_MTIME;
  const mode = e.mode ?? (type === "dir" ? 0o755 : type === "symlink" ? 0o777 : 0o644);
  const fields = {
    path: e.path,
    mode,
    uid: e.uid ?? 0,
    gid: e.gid ?? 0,
    size: e.declaredSize ?? content.length,
    mtime,
    type: TYPE_NAME[type] as never,
    linkpath: e.linkpath ?? "",
    uname: e.uname ?? "",
    gname: e.gname ?? "",
    devmaj: e.devmajor ?? 0,
    devmin: e.devminor ?? 0,
  };
  const plain = Buffer.alloc(512);
  const needLong = new Header(fields).encode(plain, 0);
  if (!needLong && !e.xattrs && !e.pax) return Buffer.concat([plain, pad512(content)]); // the common case
  const out: Buffer[] = [];
  let path = e.path;
  let linkpath = e.linkpath ?? "";
  const paxRecs: Buffer[] = [];
  if (needLong) {
    if (e.longNames === "gnu") {
      if (Buffer.byteLength(e.path) > 100) {
        out.push(metaEntry("NextFileHasLongPath", "././@LongLink", Buffer.from(`${e.path}\0`), mtime));
        path = e.path.slice(0, 99);
      }
      if (Buffer.byteLength(linkpath) > 100) {
        out.push(metaEntry("NextFileHasLongLinkpath", "././@LongLink", Buffer.from(`${linkpath}\0`), mtime));
        linkpath = linkpath.slice(0, 99);
      }
    } else {
      paxRecs.push(paxRecord("path", Buffer.from(e.path)));
      if (linkpath) paxRecs.push(paxRecord("linkpath", Buffer.from(linkpath)));
      path = `PaxShort/${e.path.split("/").pop()!.slice(0, 80)}`;
      if (Buffer.byteLength(linkpath) > 100) linkpath = linkpath.slice(0, 99);
    }
  }
  for (const [k, val] of Object.entries(e.xattrs ?? {})) paxRecs.push(paxRecord(`SCHILY.xattr.${k}`, bytes(val)));
  for (const [k, val] of Object.entries(e.pax ?? {})) paxRecs.push(paxRecord(k, Buffer.from(val)));
  if (paxRecs.length) {
    out.push(metaEntry("ExtendedHeader", `PaxHeaders/${e.path.split("/").pop()!.slice(0, 80)}`, Buffer.concat(paxRecs), mtime));
  }
  out.push(header({ ...fields, path, linkpath }));
  out.push(pad512(content));
  return Buffer.concat(out);
}

/** A complete tar (with the two zero blocks unless eof: false). */
export function buildLayerTar(entries: TarEntry[], opts: { eof?: boolean } = {}): Buffer {
  const parts = entries.map(tarEntry);
  if (opts.eof !== false) parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

/** A member of an outer archive: a file, or a symlink when `link` is set. */
export interface ArchiveMember {
  name: string;
  data: string | Uint8Array;
  link?: string;
}

/** An archive of plain files and symlinks (for outer image archives). */
export function buildTar(files: ArchiveMember[]): Buffer {
  return buildLayerTar(files.map((f) => (f.link !== undefined ? { path: f.name, type: "symlink", linkpath: f.link } : { path: f.name, content: f.data })));
}

export type Kind = "none" | "gzip" | "zstd";

export function compress(data: Uint8Array, kind: Kind): Buffer {
  if (kind === "gzip") return gzipSync(data);
  if (kind === "zstd") return zstdCompressSync(data);
  return Buffer.from(data);
}

export function decompress(data: Uint8Array): Buffer {
  if (data[0] === 0x1f && data[1] === 0x8b) return gunzipSync(data);
  if (data[0] === 0x28 && data[1] === 0xb5) return zstdDecompressSync(data);
  return Buffer.from(data);
}

export const sha256 = (data: Uint8Array | string) => `sha256:${new Bun.CryptoHasher("sha256").update(data).digest("hex")}`;

// ---- layer family -------------------------------------------------------------------------------

/** Writes layers as 1.tar, 2.tar, … (or the given names) into dir. */
export function writeLayerFamily(dir: string, layers: Uint8Array[], names?: string[]): string[] {
  mkdirSync(dir, { recursive: true });
  return layers.map((l, i) => {
    const name = names?.[i] ?? `${i + 1}.tar`;
    writeFileSync(join(dir, name), l);
    return name;
  });
}

// ---- image config -------------------------------------------------------------------------------

export interface ConfigSpec {
  architecture?: string;
  os?: string;
  variant?: string;
  env?: string[];
  entrypoint?: string[];
  cmd?: string[];
  workingDir?: string;
  user?: string;
  labels?: Record<string, string>;
}

export function imageConfig(diffIds: string[], c: ConfigSpec = {}): Buffer {
  return Buffer.from(
    JSON.stringify({
      architecture: c.architecture ?? "amd64",
      os: c.os ?? "linux",
      ...(c.variant ? { variant: c.variant } : {}),
      config: {
        Env: c.env ?? ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        ...(c.entrypoint ? { Entrypoint: c.entrypoint } : {}),
        Cmd: c.cmd ?? ["/bin/sh"],
        ...(c.workingDir ? { WorkingDir: c.workingDir } : {}),
        ...(c.user ? { User: c.user } : {}),
        ...(c.labels ? { Labels: c.labels } : {}),
      },
      rootfs: { type: "layers", diff_ids: diffIds },
      history: diffIds.map(() => ({ created_by: "test" })),
    }),
  );
}

// ---- OCI layout ---------------------------------------------------------------------------------

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { os: string; architecture: string; variant?: string };
}

export const MEDIA = {
  index: "application/vnd.oci.image.index.v1+json",
  manifest: "application/vnd.oci.image.manifest.v1+json",
  config: "application/vnd.oci.image.config.v1+json",
  layer: "application/vnd.oci.image.layer.v1.tar",
  layerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  layerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
};

export interface ImageSpec {
  /** Layer blobs as stored (plain, gzip or zstd). */
  layers: Uint8Array[];
  config?: ConfigSpec;
  platform?: { os: string; architecture: string; variant?: string };
}

export interface BuiltImage {
  manifest: Descriptor;
  config: Descriptor;
  layers: Descriptor[];
  diffIds: string[];
}

export class OciLayout {
  readonly blobs = new Map<string, Uint8Array>();

  addBlob(data: Uint8Array, mediaType: string): Descriptor {
    const digest = sha256(data);
    this.blobs.set(digest.slice(7), data);
    return { mediaType, digest, size: data.length };
  }

  addImage(img: ImageSpec): BuiltImage {
    const layers = img.layers.map((l) => {
      const mt = l[0] === 0x1f ? MEDIA.layerGzip : l[0] === 0x28 ? MEDIA.layerZstd : MEDIA.layer;
      return this.addBlob(l, mt);
    });
    const diffIds = img.layers.map((l) => sha256(decompress(l)));
    const cfgSpec = { ...img.config, ...(img.platform ?? {}) };
    const config = this.addBlob(imageConfig(diffIds, cfgSpec), MEDIA.config);
    const manifestDoc = { schemaVersion: 2, mediaType: MEDIA.manifest, config, layers };
    const manifest = this.addBlob(Buffer.from(JSON.stringify(manifestDoc)), MEDIA.manifest);
    if (img.platform) manifest.platform = img.platform;
    return { manifest, config, layers, diffIds };
  }

  addIndex(manifests: Descriptor[], annotations?: Record<string, string>): Descriptor {
    const doc = { schemaVersion: 2, mediaType: MEDIA.index, manifests, ...(annotations ? { annotations } : {}) };
    return this.addBlob(Buffer.from(JSON.stringify(doc)), MEDIA.index);
  }

  /** Members of the layout: oci-layout, index.json listing `top`, and every blob. */
  files(top: Descriptor[], extra: { name: string; data: string | Uint8Array }[] = []): { name: string; data: Uint8Array }[] {
    const index = { schemaVersion: 2, mediaType: MEDIA.index, manifests: top };
    return [
      { name: "oci-layout", data: Buffer.from(JSON.stringify({ imageLayoutVersion: "1.0.0" })) },
      { name: "index.json", data: Buffer.from(JSON.stringify(index)) },
      ...[...this.blobs].map(([hex, data]) => ({ name: `blobs/sha256/${hex}`, data })),
      ...extra.map((x) => ({ name: x.name, data: bytes(x.data) })),
    ];
  }

  writeDir(dir: string, top: Descriptor[]): string {
    for (const f of this.files(top)) {
      mkdirSync(dirname(join(dir, f.name)), { recursive: true });
      writeFileSync(join(dir, f.name), f.data);
    }
    return dir;
  }

  writeTar(path: string, top: Descriptor[]): string {
    writeFileSync(path, buildTar(this.files(top)));
    return path;
  }
}

export const REF_NAME = "org.opencontainers.image.ref.name";

export function withRef(d: Descriptor, ref: string): Descriptor {
  return { ...d, annotations: { ...d.annotations, [REF_NAME]: ref } };
}

/** One-call OCI layout: each image with an optional ref name; `tar` writes a tar instead of a dir. */
export function writeOciLayout(target: string, images: (ImageSpec & { ref?: string })[], opts: { tar?: boolean } = {}): BuiltImage[] {
  const layout = new OciLayout();
  const built = images.map((img) => layout.addImage(img));
  const top = built.map((b, i) => (images[i]!.ref ? withRef(b.manifest, images[i]!.ref!) : b.manifest));
  if (opts.tar) layout.writeTar(target, top);
  else layout.writeDir(target, top);
  return built;
}

// ---- docker-archive -----------------------------------------------------------------------------

export interface DockerImageSpec {
  tags: string[];
  /** Layer blobs as stored (docker save writes plain tars; compressed ones are legal too). */
  layers: Uint8Array[];
  config?: ConfigSpec;
}

export interface DockerArchiveInfo {
  configDigests: string[];
  diffIds: string[][];
  /** The members written, for tests that tamper with them. */
  files: ArchiveMember[];
}

/**
 * `docker save`-style archive. style "legacy": <id>/layer.tar + <hex>.json; "blobs": Docker 25+
 * (blobs/sha256/<hex> members). gzip: compress the whole archive.
 */
export function writeDockerArchive(
  path: string,
  images: DockerImageSpec[],
  opts: { style?: "legacy" | "blobs"; gzip?: boolean; mutate?: (files: ArchiveMember[]) => void } = {},
): DockerArchiveInfo {
  const style = opts.style ?? "legacy";
  const files = new Map<string, Uint8Array>();
  const manifest: { Config: string; RepoTags: string[]; Layers: string[] }[] = [];
  const configDigests: string[] = [];
  const allDiffIds: string[][] = [];
  for (const img of images) {
    const diffIds = img.layers.map((l) => sha256(decompress(l)));
    const layerNames = img.layers.map((l, i) => {
      const name = style === "blobs" ? `blobs/sha256/${sha256(l).slice(7)}` : `${sha256(diffIds.slice(0, i + 1).join(",")).slice(7)}/layer.tar`;
      files.set(name, l);
      if (style === "legacy") files.set(name.replace("layer.tar", "VERSION"), Buffer.from("1.0"));
      return name;
    });
    const cfg = imageConfig(diffIds, img.config);
    const cfgDigest = sha256(cfg);
    const cfgName = style === "blobs" ? `blobs/sha256/${cfgDigest.slice(7)}` : `${cfgDigest.slice(7)}.json`;
    files.set(cfgName, cfg);
    manifest.push({ Config: cfgName, RepoTags: img.tags, Layers: layerNames });
    configDigests.push(cfgDigest);
    allDiffIds.push(diffIds);
  }
  files.set("manifest.json", Buffer.from(JSON.stringify(manifest)));
  files.set("repositories", Buffer.from("{}"));
  const list: ArchiveMember[] = [...files].map(([name, data]) => ({ name, data }));
  opts.mutate?.(list);
  const tar = buildTar(list);
  writeFileSync(path, opts.gzip ? gzipSync(tar) : tar);
  return { configDigests, diffIds: allDiffIds, files: list };
}

// ---- small sample layers ------------------------------------------------------------------------

/** A recognisable layer: marker file /layers/<n> containing `n`, plus optional extra entries. */
export function sampleLayer(n: number, extra: TarEntry[] = []): Buffer {
  return buildLayerTar([{ path: "layers/", type: "dir" }, { path: `layers/${n}`, content: `layer ${n}\n` }, { path: "top", content: `${n}\n` }, ...extra]);
}
