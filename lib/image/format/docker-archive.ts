// docker-archive (`docker save`, `skopeo copy … docker-archive:`): manifest.json lists one or more
// images, each a config file and layer tars named by path. Paths are validated to stay inside the
// archive; the config is checked against its name when the name is its digest (legacy
// "<hex>.json", Docker 25+ "blobs/sha256/<hex>"); layers are checked against config diff_ids.
import { ThinimgError } from "../../errors.ts";
import { type Archive, memberName } from "../archive/archive.ts";
import { digestOf, shortDigest } from "../digest.ts";
import type { ImageConfig, LayerRef, ResolvedImage } from "../types.ts";
import { MAGIC_BYTES, makeLayerRef, sniffCompression } from "./layer.ts";
import { refMatches } from "./ref.ts";
import { DockerManifest, ImageConfigDoc, parseDoc, toImageConfig } from "./schemas.ts";

const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

export interface DockerArchiveOptions {
  source: string;
  select?: string | undefined;
  maxLayerBytes: number;
  maxBlobBytes: number;
}

/** The digest a member's name promises, if any: "blobs/sha256/<hex>", "<hex>.json", "<hex>.tar". */
function digestFromName(name: string): string | null {
  const m = /^(?:blobs\/sha256\/([0-9a-f]{64})|([0-9a-f]{64})\.(?:json|tar))$/.exec(name);
  const hex = m?.[1] ?? m?.[2];
  return hex ? `sha256:${hex}` : null;
}

type ManifestEntry = DockerManifest[number];

export async function resolveDockerArchive(archive: Archive, o: DockerArchiveOptions): Promise<ResolvedImage> {
  const what = archive.what;
  const manifest = parseDoc(DockerManifest, await archive.read("manifest.json", MAX_MANIFEST_BYTES), `${what}: manifest.json`);
  const { entry, name } = pickEntry(manifest, what, o.select);
  const { config, configDigest } = await readConfig(archive, what, entry);
  const total = entry.Layers.length;
  const layers: LayerRef[] = [];
  for (const [i, raw] of entry.Layers.entries()) layers.push(await layerOf(archive, o, i, total, raw, config.diffIds?.[i] ?? null));
  return {
    source: o.source,
    format: "docker-archive",
    name,
    id: configDigest,
    platform: config.os && config.architecture ? `${config.os}/${config.architecture}${config.variant ? `/${config.variant}` : ""}` : null,
    config,
    layers,
  };
}

/** The manifest entry to use (the one tagged `select`, else the only one) and its name. */
function pickEntry(manifest: DockerManifest, what: string, select: string | undefined): { entry: ManifestEntry; name: string | null } {
  const allTags = manifest.flatMap((m) => m.RepoTags ?? []);
  if (select) {
    const hits = manifest.filter((m) => (m.RepoTags ?? []).some((t) => refMatches(t, select)));
    if (hits.length === 0) {
      throw new ThinimgError("input", `${what}: no image tagged ${JSON.stringify(select)}`, {
        hint: allTags.length ? `available: ${allTags.slice(0, 10).join(", ")}${allTags.length > 10 ? ", …" : ""}` : "the archive has no tags; omit the :TAG",
      });
    }
    if (new Set(hits.map((h) => h.Config)).size > 1) {
      throw new ThinimgError("input", `${what}: several images are tagged ${JSON.stringify(select)}`);
    }
    const entry = hits[0]!;
    return { entry, name: (entry.RepoTags ?? []).find((t) => refMatches(t, select)) ?? select };
  }
  if (manifest.length > 1) {
    throw new ThinimgError("input", `${what}: holds ${manifest.length} images; choose one`, {
      hint: allTags.length ? `append :TAG to the source (available: ${allTags.slice(0, 10).join(", ")})` : "append :TAG to the source",
    });
  }
  const entry = manifest[0]!;
  return { entry, name: entry.RepoTags?.[0] ?? null };
}

/** The entry's config, checked against its name's digest and the entry's layer count. */
async function readConfig(archive: Archive, what: string, entry: ManifestEntry): Promise<{ config: ImageConfig; configDigest: string }> {
  const configName = memberName(entry.Config, `${what}: manifest.json Config`);
  const configBytes = await archive.read(configName, MAX_CONFIG_BYTES);
  const configDigest = digestOf(configBytes);
  const promised = digestFromName(configName);
  if (promised && promised !== configDigest) {
    throw new ThinimgError("input", `${what}: config ${configName}: digest mismatch: got ${configDigest}`, {
      hint: "the archive is corrupt or was tampered with; do not use it",
    });
  }
  const config = toImageConfig(parseDoc(ImageConfigDoc, configBytes, `${what}: config ${configName}`), configDigest);
  if (config.diffIds !== null && config.diffIds.length !== entry.Layers.length) {
    throw new ThinimgError("input", `${what}: manifest.json lists ${entry.Layers.length} layers but the config has ${config.diffIds.length} diff_ids`, {
      hint: "the archive is inconsistent; save the image again",
    });
  }
  return { config, configDigest };
}

/** Layer i (of `total`), stored as member `raw`, with the config's `diffId` for it. */
async function layerOf(archive: Archive, o: DockerArchiveOptions, i: number, total: number, raw: string, diffId: string | null): Promise<LayerRef> {
  const what = archive.what;
  const lwhat = `${what}: layer ${i + 1}/${total}`;
  const member = memberName(raw, `${what}: manifest.json Layers[${i}]`);
  const size = archive.size(member);
  if (size === null) {
    throw new ThinimgError("input", `${lwhat}: ${member} is missing from the archive`, {
      hint: "the archive is incomplete (was `docker save` interrupted?)",
    });
  }
  if (size > o.maxBlobBytes) {
    throw new ThinimgError("policy", `${lwhat}: ${size} bytes exceeds the ${o.maxBlobBytes}-byte blob limit`);
  }
  const compression = sniffCompression(await archive.head(member, MAGIC_BYTES), lwhat);
  // The stored bytes' digest: promised by the name, equal to the diff_id when uncompressed,
  // otherwise computed now (one read; legacy archives with compressed layers are rare).
  let digest = digestFromName(member);
  if (!digest && compression === "none" && diffId) digest = diffId;
  if (!digest) {
    const h = new Bun.CryptoHasher("sha256");
    for await (const chunk of archive.open(member)) h.update(chunk);
    digest = `sha256:${h.digest("hex")}`;
  }
  return makeLayerRef({
    index: i,
    total,
    digest,
    diffId,
    size,
    compression,
    name: shortDigest(digest),
    maxLayerBytes: o.maxLayerBytes,
    openRaw: () => archive.open(member),
  });
}
