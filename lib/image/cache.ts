// Content-addressed blob cache: <stateDir>/blobs/sha256/<hex>. A blob is written to a temp file in
// the same directory tree, hashed while written, fsync'ed, then renamed into place: a reader never
// sees a partial blob, and two processes fetching the same blob both end with the same file.
// A small source index (<stateDir>/blobs/sources/<sha256(key)>.json) remembers which digest a remote
// object (URL or S3 key + ETag + size) had, so a re-run does not download it again.
import {
  closeSync,
  existsSync,
  fsyncSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import * as v from "valibot";
import { ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import { digestHex, sha256Hex, tooBig } from "./digest.ts";

export interface IngestOptions {
  /** What is being stored, for messages. */
  what: string;
  maxBytes: number;
  /** Refuse the blob unless its sha256 is this. */
  digest?: string | null;
  /** Refuse the blob unless it is exactly this long. */
  size?: number | null;
  onBytes?(n: number): void;
  signal?: AbortSignal;
}

export interface StoredBlob {
  digest: string;
  size: number;
  path: string;
}

const SourceRecord = v.object({
  key: v.string(),
  etag: v.nullable(v.string()),
  size: v.number(),
  digest: v.pipe(v.string(), v.regex(/^sha256:[0-9a-f]{64}$/)),
  lastModified: v.optional(v.nullable(v.string())),
  savedAt: v.string(),
});
export type SourceRecord = v.InferOutput<typeof SourceRecord>;

/** Temp files older than this are leftovers of a crashed run. */
const STALE_TMP_MS = 24 * 3_600_000;

export class BlobCache {
  readonly root: string;
  private readonly blobDir: string;
  private readonly tmpDir: string;
  private readonly srcDir: string;

  constructor(stateDir: string) {
    this.root = join(stateDir, "blobs");
    this.blobDir = join(this.root, "sha256");
    this.tmpDir = join(this.root, "tmp");
    this.srcDir = join(this.root, "sources");
    try {
      for (const d of [this.blobDir, this.tmpDir, this.srcDir]) mkdirSync(d, { recursive: true, mode: 0o755 });
    } catch (e) {
      throw new ThinimgError("missing", `cannot create the blob cache in ${this.root}: ${(e as Error).message}`, {
        hint: "pass --state-dir (or THINIMG_STATE_DIR) pointing at a writable directory",
      });
    }
    this.sweepTmp();
  }

  path(digest: string): string {
    return join(this.blobDir, digestHex(digest, "blob"));
  }

  /** True when the blob is present (a regular file). Content is verified when it is read. */
  has(digest: string): boolean {
    try {
      return lstatSync(this.path(digest)).isFile();
    } catch {
      return false;
    }
  }

  /** Remove a blob that failed verification so the next run fetches it again. */
  evict(digest: string): void {
    try {
      unlinkSync(this.path(digest));
      log.warn(`evicted corrupt cache blob ${digest}`);
    } catch {
      // already gone
    }
  }

  /** Stream into the cache: hash + count while writing, temp file + fsync + rename. */
  async ingest(stream: ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>, o: IngestOptions): Promise<StoredBlob> {
    const tmp = join(this.tmpDir, `${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}`);
    const fd = openSync(tmp, "wx", 0o644);
    const h = new Bun.CryptoHasher("sha256");
    let n = 0;
    let ok = false;
    try {
      for await (const chunk of stream) {
        if (o.signal?.aborted) throw new ThinimgError("timeout", `${o.what}: aborted`);
        n += chunk.length;
        // The cap applies to bytes actually received, whatever a header or manifest said.
        if (n > o.maxBytes) throw tooBig(o.what, o.maxBytes);
        if (o.size != null && n > o.size) {
          throw new ThinimgError("input", `${o.what}: more than the ${o.size} bytes expected`, {
            hint: "the object changed while being read, or the server lies about its size; retry",
          });
        }
        h.update(chunk);
        let off = 0;
        while (off < chunk.length) off += writeSync(fd, chunk, off, chunk.length - off);
        o.onBytes?.(n);
      }
      fsyncSync(fd);
      const digest = `sha256:${h.digest("hex")}`;
      if (o.size != null && n !== o.size) {
        throw new ThinimgError("input", `${o.what}: truncated: got ${n} of ${o.size} bytes`, {
          hint: "the transfer was cut short or the object changed while being read; retry",
        });
      }
      if (o.digest && o.digest !== digest) {
        throw new ThinimgError("input", `${o.what}: digest mismatch: expected ${o.digest}, got ${digest}`, {
          hint: "the blob is corrupt or was tampered with; do not use it",
        });
      }
      const dest = this.path(digest);
      renameSync(tmp, dest);
      ok = true;
      return { digest, size: n, path: dest };
    } finally {
      closeSync(fd);
      if (!ok) rmSync(tmp, { force: true });
    }
  }

  // ---- source index -------------------------------------------------------------------------------

  private recordPath(key: string): string {
    return join(this.srcDir, `${sha256Hex(key)}.json`);
  }

  /** The digest a remote object had last time, if its blob is still in the cache. */
  lookupSource(key: string): SourceRecord | null {
    const p = this.recordPath(key);
    if (!existsSync(p)) return null;
    try {
      const r = v.safeParse(SourceRecord, JSON.parse(readFileSync(p, "utf8")));
      if (!r.success || r.output.key !== key || !this.has(r.output.digest)) return null;
      return r.output;
    } catch {
      return null; // a damaged record only costs a download
    }
  }

  recordSource(rec: Omit<SourceRecord, "savedAt">): void {
    const p = this.recordPath(rec.key);
    const tmp = `${p}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify({ ...rec, savedAt: new Date().toISOString() }));
    renameSync(tmp, p);
  }

  private sweepTmp(): void {
    const now = Date.now();
    for (const name of readdirSync(this.tmpDir)) {
      const p = join(this.tmpDir, name);
      try {
        if (now - statSync(p).mtimeMs > STALE_TMP_MS) rmSync(p, { force: true });
      } catch {
        // raced with another process
      }
    }
  }
}
