// Content digests: only sha256 (what OCI, docker and our cache use). A digest string that is not
// exactly "sha256:<64 lowercase hex>" is refused before it can become a path.
import { quoted, ThinimgError } from "../errors.ts";

const SHA256 = /^sha256:([0-9a-f]{64})$/;

/** "sha256:<hex>" → "<hex>"; anything else is an input error naming `what`. */
export function digestHex(digest: string, what = "digest"): string {
  const m = SHA256.exec(digest);
  if (!m) {
    const algo = /^([a-z0-9+._-]+):/.exec(String(digest))?.[1];
    throw new ThinimgError(
      "input",
      algo && algo !== "sha256"
        ? `${what}: unsupported digest algorithm ${quoted(algo, 40)} in ${quoted(String(digest), 100)}`
        : `${what}: invalid digest ${quoted(String(digest), 100)}`,
      { hint: "only sha256:<64 lowercase hex> digests are accepted" },
    );
  }
  return m[1]!;
}

export function shortDigest(digest: string): string {
  return digest.startsWith("sha256:") ? `sha256:${digest.slice(7, 19)}` : digest;
}

export function sha256Hex(data: Uint8Array | string): string {
  return new Bun.CryptoHasher("sha256").update(data).digest("hex");
}

export function digestOf(data: Uint8Array | string): string {
  return `sha256:${sha256Hex(data)}`;
}

/** Streaming sha256 of a file, with an optional cap on the bytes read. */
export async function sha256File(path: string, maxBytes = Number.POSITIVE_INFINITY): Promise<{ digest: string; size: number }> {
  const h = new Bun.CryptoHasher("sha256");
  let size = 0;
  for await (const chunk of Bun.file(path).stream()) {
    size += chunk.length;
    if (size > maxBytes) throw tooBig(path, maxBytes);
    h.update(chunk);
  }
  return { digest: `sha256:${h.digest("hex")}`, size };
}

export function tooBig(what: string, maxBytes: number): ThinimgError {
  return new ThinimgError("policy", `${what}: larger than the ${maxBytes}-byte limit`, {
    hint: "raise the limit (--max-blob-size / THINIMG_MAX_BLOB_SIZE) if the image is legitimate",
  });
}
