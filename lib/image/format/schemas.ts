// valibot schemas for the JSON documents inside images: OCI descriptors, indexes, manifests, image
// configs and docker-archive's manifest.json. Loose objects: unknown fields are allowed (specs add
// fields), but every field we use is type-checked, and digests are checked for shape here.
import * as v from "valibot";
import { ThinimgError } from "../../errors.ts";
import type { ImageConfig } from "../types.ts";

// Digest strings are validated when used (digestHex), so an unsupported algorithm gets a clear error.
const Digest = v.pipe(v.string(), v.maxLength(200));
const StrArray = v.array(v.string());

export const Platform = v.looseObject({
  architecture: v.string(),
  os: v.string(),
  variant: v.optional(v.string()),
  "os.version": v.optional(v.string()),
});

export const Descriptor = v.looseObject({
  mediaType: v.optional(v.string()),
  digest: Digest,
  size: v.pipe(v.number(), v.integer(), v.minValue(0)),
  annotations: v.optional(v.nullable(v.record(v.string(), v.string()))),
  platform: v.optional(v.nullable(Platform)),
  urls: v.optional(v.nullable(StrArray)),
});
export type Descriptor = v.InferOutput<typeof Descriptor>;

export const OciIndex = v.looseObject({
  schemaVersion: v.literal(2),
  mediaType: v.optional(v.string()),
  manifests: v.array(Descriptor),
  annotations: v.optional(v.nullable(v.record(v.string(), v.string()))),
});
export type OciIndex = v.InferOutput<typeof OciIndex>;

export const OciManifest = v.looseObject({
  schemaVersion: v.literal(2),
  mediaType: v.optional(v.string()),
  config: Descriptor,
  layers: v.array(Descriptor),
  annotations: v.optional(v.nullable(v.record(v.string(), v.string()))),
});
export type OciManifest = v.InferOutput<typeof OciManifest>;

export const OciLayoutFile = v.looseObject({ imageLayoutVersion: v.string() });

export const DockerManifest = v.pipe(
  v.array(
    v.looseObject({
      Config: v.string(),
      RepoTags: v.optional(v.nullable(StrArray)),
      Layers: StrArray,
    }),
  ),
  v.minLength(1, "lists no images"),
);
export type DockerManifest = v.InferOutput<typeof DockerManifest>;

const NullableStrArray = v.optional(v.nullable(StrArray));

export const ImageConfigDoc = v.looseObject({
  architecture: v.optional(v.string()),
  os: v.optional(v.string()),
  variant: v.optional(v.string()),
  config: v.optional(
    v.nullable(
      v.looseObject({
        Env: NullableStrArray,
        Entrypoint: NullableStrArray,
        Cmd: NullableStrArray,
        WorkingDir: v.optional(v.nullable(v.string())),
        User: v.optional(v.nullable(v.string())),
        Labels: v.optional(v.nullable(v.record(v.string(), v.string()))),
      }),
    ),
  ),
  // Optional: diff_ids are verified when the config has them (OCI requires rootfs, but configs
  // written by other tools may omit it; the blob digests still verify every byte).
  rootfs: v.optional(
    v.looseObject({
      type: v.literal("layers"),
      diff_ids: v.array(v.pipe(v.string(), v.regex(/^sha256:[0-9a-f]{64}$/, "must be sha256:<64 hex>"))),
    }),
  ),
});

/** Parse JSON bytes against a schema; one-line input error naming the document on failure. */
export function parseDoc<T extends v.GenericSchema>(schema: T, bytes: Uint8Array, what: string): v.InferOutput<T> {
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new ThinimgError("input", `${what}: not valid JSON (${(e as Error).message})`, {
      hint: "the image archive is damaged or not an image",
    });
  }
  const r = v.safeParse(schema, json);
  if (!r.success) {
    const issue = r.issues[0];
    const path = v.getDotPath(issue);
    throw new ThinimgError("input", `${what}: ${path ? `${path}: ` : ""}${issue.message}`, {
      hint: "the image metadata does not follow the OCI / docker image spec",
    });
  }
  return r.output;
}

export function toImageConfig(doc: v.InferOutput<typeof ImageConfigDoc>, digest: string): ImageConfig {
  const c = doc.config ?? {};
  return {
    digest,
    architecture: doc.architecture ?? null,
    os: doc.os ?? null,
    variant: doc.variant ?? null,
    env: c.Env ?? [],
    entrypoint: c.Entrypoint ?? null,
    cmd: c.Cmd ?? null,
    workingDir: c.WorkingDir || null,
    user: c.User || null,
    labels: c.Labels ?? {},
    diffIds: doc.rootfs?.diff_ids ?? null,
  };
}
