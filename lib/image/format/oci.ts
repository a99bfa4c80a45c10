// OCI image layout (directory or tar): index.json → (nested indexes) → manifest → config + layers.
// Every blob is addressed only as blobs/sha256/<64 hex> derived from a validated digest — never a
// path from the document — and every blob read is checked against its descriptor's size and digest.
import { ThinimgError } from "../../errors.ts";
import { log } from "../../log.ts";
import type { Archive } from "../archive/archive.ts";
import { digestHex, digestOf, shortDigest } from "../digest.ts";
import type { ImageConfig, LayerRef, ResolvedImage } from "../types.ts";
import { MAGIC_BYTES, makeLayerRef, sniffCompression } from "./layer.ts";
import { formatPlatform, hostPlatform, type PlatformSpec, parsePlatform, platformMatches } from "./platform.ts";
import { refMatches } from "./ref.ts";
import { type Descriptor, ImageConfigDoc, OciIndex, OciLayoutFile, OciManifest, parseDoc, toImageConfig } from "./schemas.ts";

export const REF_NAME = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME = "io.containerd.image.name";

const MT = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
};

const LAYER_TYPES = new Set([
  "application/vnd.oci.image.layer.v1.tar",
  "application/vnd.oci.image.layer.v1.tar+gzip",
  "application/vnd.oci.image.layer.v1.tar+zstd",
  "application/vnd.oci.image.layer.nondistributable.v1.tar",
  "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
  "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
  "application/vnd.docker.image.rootfs.diff.tar",
  "application/vnd.docker.image.rootfs.diff.tar.gzip",
  "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
]);

/** Caps for metadata documents: real ones are a few KiB. */
const MAX_INDEX_BYTES = 4 * 1024 * 1024;
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;
const MAX_DEPTH = 4;
const MAX_DESCRIPTORS = 4096;

export interface OciOptions {
  source: string;
  select?: string | undefined;
  platform?: string | undefined;
  maxLayerBytes: number;
}

const isIndex = (d: Descriptor) => d.mediaType === MT.ociIndex || d.mediaType === MT.dockerList;
const isAttestation = (d: Descriptor) =>
  d.annotations?.["vnd.docker.reference.type"] === "attestation-manifest" || (d.platform?.os === "unknown" && d.platform?.architecture === "unknown");

export function blobName(digest: string, what: string): string {
  return `blobs/sha256/${digestHex(digest, what)}`;
}

/** Read a whole (small) blob, checking descriptor size and digest before parsing anything. */
async function readBlob(archive: Archive, d: Descriptor, max: number, what: string): Promise<Uint8Array> {
  const name = blobName(d.digest, what);
  const have = archive.size(name);
  if (have === null)
    throw new ThinimgError("input", `${what}: blob ${d.digest} is missing from ${archive.what}`, {
      hint: "the OCI layout is incomplete",
    });
  if (have !== d.size) {
    throw new ThinimgError("input", `${what}: blob ${shortDigest(d.digest)} is ${have} bytes, descriptor says ${d.size}`, {
      hint: "the OCI layout is corrupt or was tampered with",
    });
  }
  if (d.size > max) throw new ThinimgError("policy", `${what}: ${d.size} bytes is too large for metadata (max ${max})`);
  const bytes = await archive.read(name, max);
  const got = digestOf(bytes);
  if (got !== d.digest) {
    throw new ThinimgError("input", `${what}: digest mismatch: expected ${d.digest}, got ${got}`, {
      hint: "the OCI layout is corrupt or was tampered with; do not use it",
    });
  }
  return bytes;
}

interface Found {
  desc: Descriptor;
  /** ref.name (or containerd name) on the path to it. */
  refName: string | null;
}

function refNamesOf(d: Descriptor): string[] {
  const a = d.annotations ?? {};
  return [a[REF_NAME], a[CONTAINERD_NAME]].filter((x): x is string => typeof x === "string" && x !== "");
}

/** Indexes by digest, read once each, within the depth and descriptor caps. */
function indexReader(archive: Archive): (d: Descriptor, depth: number) => Promise<OciIndex> {
  const what = archive.what;
  let seen = 0;
  const cache = new Map<string, OciIndex>();
  return async (d, depth) => {
    if (depth > MAX_DEPTH) throw new ThinimgError("input", `${what}: indexes nested more than ${MAX_DEPTH} deep`);
    const cached = cache.get(d.digest);
    if (cached) return cached;
    const idx = parseDoc(OciIndex, await readBlob(archive, d, MAX_INDEX_BYTES, `${what}: index`), `${what}: index ${shortDigest(d.digest)}`);
    seen += idx.manifests.length;
    if (seen > MAX_DESCRIPTORS) throw new ThinimgError("policy", `${what}: more than ${MAX_DESCRIPTORS} descriptors`);
    cache.set(d.digest, idx);
    return idx;
  };
}
type LoadIndex = ReturnType<typeof indexReader>;

async function checkLayoutVersion(archive: Archive): Promise<void> {
  if (archive.size("oci-layout") === null) return;
  const layout = parseDoc(OciLayoutFile, await archive.read("oci-layout", 64 * 1024), `${archive.what}: oci-layout`);
  if (!/^1\./.test(layout.imageLayoutVersion)) {
    throw new ThinimgError("input", `${archive.what}: unsupported OCI layout version ${layout.imageLayoutVersion}`, {
      hint: "only image layout 1.x is supported",
    });
  }
}

/** The image named `select` (a ref name anywhere in the index tree). */
async function selectByRef(what: string, index: OciIndex, select: string, loadIndex: LoadIndex, want: PlatformSpec): Promise<Found> {
  const found: Found[] = [];
  const all: string[] = [];
  const walk = async (descs: Descriptor[], depth: number) => {
    for (const d of descs) {
      const names = refNamesOf(d);
      all.push(...names);
      const hit = names.find((n) => refMatches(n, select));
      if (hit) found.push({ desc: d, refName: hit });
      else if (isIndex(d) && depth < MAX_DEPTH) await walk((await loadIndex(d, depth + 1)).manifests, depth + 1);
    }
  };
  await walk(index.manifests, 0);
  const distinct = [...new Map(found.map((f) => [f.desc.digest, f])).values()];
  if (distinct.length === 0) {
    const avail = [...new Set(all)];
    throw new ThinimgError("input", `${what}: no image named ${JSON.stringify(select)}`, {
      hint: avail.length ? `available: ${avail.slice(0, 10).join(", ")}${avail.length > 10 ? ", …" : ""}` : "the layout has no named images; omit the :REF",
    });
  }
  if (distinct.length === 1) return distinct[0]!;
  // One name for several platforms' manifests (e.g. skopeo/oras per-arch copies tagged alike):
  // choose by platform like an index would (the host's unless --platform says otherwise).
  if (!distinct.every((f) => f.desc.platform && !isIndex(f.desc))) {
    throw new ThinimgError("input", `${what}: ${distinct.length} different images are named ${JSON.stringify(select)}`, {
      hint: "use a layout with unique names (these are not per-platform manifests)",
    });
  }
  const d = pickPlatform(
    distinct.map((f) => f.desc),
    want,
    `${what}: ${JSON.stringify(select)}`,
  );
  return distinct.find((f) => f.desc === d)!;
}

/** No name asked for: the one image at the top, or a platform's among unnamed per-arch manifests. */
function selectDefault(what: string, index: OciIndex, want: PlatformSpec): Found {
  const tops = index.manifests.filter((d) => !isAttestation(d));
  if (tops.length === 1) return { desc: tops[0]!, refName: refNamesOf(tops[0]!)[0] ?? null };
  if (tops.length === 0) throw new ThinimgError("input", `${what}: index.json lists no images`);
  const perArch =
    tops.every((d) => !isIndex(d) && d.platform) && new Set(tops.map((d) => d.digest)).size === tops.length && tops.every((d) => refNamesOf(d).length === 0);
  if (perArch) return { desc: pickPlatform(tops, want, what), refName: null };
  const names = tops.flatMap(refNamesOf);
  throw new ThinimgError("input", `${what}: holds ${tops.length} images; choose one`, {
    hint: names.length ? `append :REF to the source (available: ${[...new Set(names)].slice(0, 10).join(", ")})` : "append :REF to the source",
  });
}

/** Down through (nested) indexes by platform to an image manifest's descriptor. */
async function descend(what: string, chosen: Descriptor, loadIndex: LoadIndex, want: PlatformSpec): Promise<{ desc: Descriptor; platform: string | null }> {
  let desc = chosen;
  let platform: string | null = desc.platform ? formatPlatform(desc.platform) : null;
  for (let depth = 0; isIndex(desc); depth++) {
    const idx = await loadIndex(desc, depth + 1);
    desc = pickPlatform(
      idx.manifests.filter((d) => !isAttestation(d)),
      want,
      `${what}: index ${shortDigest(desc.digest)}`,
    );
    platform = desc.platform ? formatPlatform(desc.platform) : platform;
  }
  if (desc.mediaType && desc.mediaType !== MT.ociManifest && desc.mediaType !== MT.dockerManifest) {
    throw new ThinimgError("input", `${what}: ${shortDigest(desc.digest)} is a ${desc.mediaType}, not an image manifest`, {
      hint: "select a container image, not an artifact",
    });
  }
  return { desc, platform };
}

/** The manifest and its config, checked against each other and the wanted platform. */
async function manifestAndConfig(
  archive: Archive,
  desc: Descriptor,
  o: OciOptions,
  want: PlatformSpec,
): Promise<{ manifest: OciManifest; config: ImageConfig; platform: string | null }> {
  const what = archive.what;
  const manifestWhat = `${what}: manifest ${shortDigest(desc.digest)}`;
  const manifest = parseDoc(OciManifest, await readBlob(archive, desc, MAX_INDEX_BYTES, manifestWhat), manifestWhat);
  if (manifest.mediaType && manifest.mediaType !== MT.ociManifest && manifest.mediaType !== MT.dockerManifest) {
    throw new ThinimgError("input", `${manifestWhat}: media type ${manifest.mediaType} is not an image manifest`);
  }
  const cm = manifest.config.mediaType;
  if (cm && cm !== MT.ociConfig && cm !== MT.dockerConfig) {
    throw new ThinimgError("input", `${manifestWhat}: config media type ${cm} is not a container image config`, {
      hint: "this is an OCI artifact, not a container image",
    });
  }
  const configBytes = await readBlob(archive, manifest.config, MAX_CONFIG_BYTES, `${what}: config`);
  const config = toImageConfig(parseDoc(ImageConfigDoc, configBytes, `${what}: config ${shortDigest(manifest.config.digest)}`), manifest.config.digest);
  if (config.diffIds !== null && config.diffIds.length !== manifest.layers.length) {
    throw new ThinimgError("input", `${manifestWhat}: ${manifest.layers.length} layers but the config lists ${config.diffIds.length} diff_ids`, {
      hint: "the image is inconsistent; rebuild it",
    });
  }
  let platform: string | null = null;
  if (config.os && config.architecture) {
    const cfgPlat = { os: config.os, architecture: config.architecture, variant: config.variant };
    if (!platformMatches(cfgPlat, want)) {
      if (o.platform) throw new ThinimgError("input", `${what}: image is ${formatPlatform(cfgPlat)}, not ${o.platform}`);
      log.warn(`${what}: image is ${formatPlatform(cfgPlat)}; this host is ${formatPlatform(want)}`);
    }
    platform = formatPlatform(cfgPlat);
  }
  return { manifest, config, platform };
}

/** One layer: a supported media type, its blob present with the descriptor's size. */
async function layerRef(archive: Archive, l: Descriptor, i: number, total: number, diffId: string | null, o: OciOptions): Promise<LayerRef> {
  const lwhat = `${archive.what}: layer ${i + 1}/${total}`;
  if (l.mediaType && !LAYER_TYPES.has(l.mediaType)) {
    throw new ThinimgError("input", `${lwhat}: unsupported media type ${l.mediaType}`, {
      hint: "only tar, tar+gzip and tar+zstd layers are supported (no encrypted or artifact layers)",
    });
  }
  const name = blobName(l.digest, lwhat);
  const size = archive.size(name);
  if (size === null) {
    throw new ThinimgError("input", `${lwhat}: blob ${l.digest} is missing from the layout`, {
      hint: l.urls?.length ? "it is a non-distributable layer; fetch it into the layout first" : "the OCI layout is incomplete",
    });
  }
  if (size !== l.size)
    throw new ThinimgError("input", `${lwhat}: blob is ${size} bytes, descriptor says ${l.size}`, { hint: "the OCI layout is corrupt or was tampered with" });
  const compression = sniffCompression(await archive.head(name, MAGIC_BYTES), lwhat);
  return makeLayerRef({
    index: i,
    total,
    digest: l.digest,
    diffId,
    size,
    compression,
    name: shortDigest(l.digest),
    maxLayerBytes: o.maxLayerBytes,
    openRaw: () => archive.open(name),
  });
}

export async function resolveOci(archive: Archive, o: OciOptions): Promise<ResolvedImage> {
  const what = archive.what;
  await checkLayoutVersion(archive);
  const index = parseDoc(OciIndex, await archive.read("index.json", MAX_INDEX_BYTES), `${what}: index.json`);
  const loadIndex = indexReader(archive);
  const want: PlatformSpec = o.platform ? parsePlatform(o.platform) : hostPlatform();
  const chosen = o.select ? await selectByRef(what, index, o.select, loadIndex, want) : selectDefault(what, index, want);
  const { desc, platform } = await descend(what, chosen.desc, loadIndex, want);
  const { manifest, config, platform: cfgPlatform } = await manifestAndConfig(archive, desc, o, want);
  const total = manifest.layers.length;
  const layers: LayerRef[] = [];
  for (const [i, l] of manifest.layers.entries()) layers.push(await layerRef(archive, l, i, total, config.diffIds?.[i] ?? null, o));
  return { source: o.source, format: "oci-layout", name: o.select ?? chosen.refName, id: desc.digest, platform: platform ?? cfgPlatform, config, layers };
}

function pickPlatform(descs: Descriptor[], want: PlatformSpec, what: string): Descriptor {
  const withPlat = descs.filter((d) => d.platform);
  const hits = withPlat.filter((d) => platformMatches(d.platform!, want));
  if (hits.length >= 1) {
    // Prefer an exact variant match, then the first listed (the index order is the author's preference).
    return hits.find((d) => (d.platform!.variant ?? null) === want.variant) ?? hits[0]!;
  }
  if (descs.length === 1 && !descs[0]!.platform) return descs[0]!; // single, unlabelled: the image itself
  const avail = withPlat.map((d) => formatPlatform(d.platform!));
  throw new ThinimgError("input", `${what}: no image for platform ${formatPlatform(want)}`, {
    hint: avail.length ? `available: ${[...new Set(avail)].join(", ")}; pass --platform` : "the index carries no platform information",
  });
}
