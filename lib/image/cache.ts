// Content-addressed blob cache: <stateDir>/blobs/sha256/<hex>. A blob is written to a temp file in
// the same directory tree, hashed while written, fsync'ed, then renamed into place: a reader never
// sees a partial blob, and two processes fetching the same blob both end with the same file.
// A small source index (<stateDir>/blobs/sources/<sha256(key)>.json) remembers which digest a remote
// object (URL or S3 key + ETag + size) had, so a re-run does not download it again. An interrupted
// download of an object with an ETag is kept in blobs/partial/ and resumed (HTTP Range) next time.
// A digest index (<stateDir>/blobs/digests/) remembers the sha256 of bytes named by what identifies
// them without reading them (a local file's device, inode, size and mtime), so they are hashed once.
import {
  closeSync,
  existsSync,
  fsyncSync,
  ftruncateSync,
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
  /** The temp file the blob is being written to, and how many bytes it already holds (a resumed
   * partial): a reader may follow it while it grows (bytes up to the last onBytes count are written). */
  onTmp?(path: string, bytes: number): void;
  signal?: AbortSignal | undefined;
  /** Continue a claimed partial download: its bytes are hashed first, new bytes are appended. */
  resume?: PartialDownload | undefined;
  /** On an interrupted transfer, keep what arrived under this key for a later resume. */
  keepPartial?: { key: string; etag: string; size: number | null } | undefined;
}

/** Bytes of an interrupted download, claimed (moved to a private temp file) by one process. */
export interface PartialDownload {
  tmp: string;
  bytes: number;
  etag: string;
  size: number | null;
}

const PartialMeta = v.object({ key: v.string(), etag: v.string(), size: v.nullable(v.number()) });

/** Interrupted transfers (network errors, aborts, short bodies) can resume; refusals cannot. */
function resumable(e: unknown): boolean {
  if (!(e instanceof ThinimgError)) return true;
  return e.kind === "timeout" || e.details?.resumable === true;
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

/** Temp files and partial downloads older than this are leftovers nobody will resume. */
const STALE_TMP_MS = 24 * 3_600_000;

export class BlobCache {
  readonly root: string;
  private readonly blobDir: string;
  private readonly tmpDir: string;
  private readonly srcDir: string;
  private readonly partialDir: string;
  private readonly digestDir: string;

  constructor(stateDir: string) {
    this.root = join(stateDir, "blobs");
    this.blobDir = join(this.root, "sha256");
    this.tmpDir = join(this.root, "tmp");
    this.srcDir = join(this.root, "sources");
    this.partialDir = join(this.root, "partial");
    this.digestDir = join(this.root, "digests");
    try {
      for (const d of [this.blobDir, this.tmpDir, this.srcDir, this.partialDir, this.digestDir]) mkdirSync(d, { recursive: true, mode: 0o755 });
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

  private newTmp(): string {
    return join(this.tmpDir, `${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}`);
  }

  /**
   * Stream into the cache: hash + count while writing, temp file + fsync + rename. With `resume`,
   * the claimed partial's bytes are hashed and the stream appended; with `keepPartial`, an
   * interrupted transfer leaves its bytes for claimPartial() instead of deleting them.
   */
  async ingest(stream: ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>, o: IngestOptions): Promise<StoredBlob> {
    const tmp = o.resume?.tmp ?? this.newTmp();
    const fd = o.resume ? openSync(tmp, "r+") : openSync(tmp, "wx", 0o644);
    o.onTmp?.(tmp, o.resume?.bytes ?? 0);
    const h = new Bun.CryptoHasher("sha256");
    let n = 0;
    let ok = false;
    let kept = false;
    try {
      if (o.resume) {
        for await (const chunk of Bun.file(tmp).slice(0, o.resume.bytes).stream()) {
          h.update(chunk);
          n += chunk.length;
        }
        if (n !== o.resume.bytes) throw new ThinimgError("internal", `${o.what}: partial download shrank`);
        ftruncateSync(fd, n);
      }
      for await (const chunk of stream) {
        if (o.signal?.aborted) throw new ThinimgError("timeout", `${o.what}: aborted`);
        const at = n;
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
        while (off < chunk.length) off += writeSync(fd, chunk, off, chunk.length - off, at + off);
        o.onBytes?.(n);
      }
      fsyncSync(fd);
      const digest = `sha256:${h.digest("hex")}`;
      if (o.size != null && n !== o.size) {
        throw new ThinimgError("input", `${o.what}: truncated: got ${n} of ${o.size} bytes`, {
          hint: "the transfer was cut short; run again to resume it",
          details: { resumable: true },
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
    } catch (e) {
      if (o.keepPartial && n > 0 && resumable(e)) kept = this.savePartial(tmp, o.keepPartial);
      throw e;
    } finally {
      closeSync(fd);
      if (!ok && !kept) rmSync(tmp, { force: true });
    }
  }

  // ---- interrupted downloads ----------------------------------------------------------------------

  private partialPaths(key: string): { data: string; meta: string } {
    const base = join(this.partialDir, sha256Hex(key));
    return { data: base, meta: `${base}.json` };
  }

  private savePartial(tmp: string, meta: { key: string; etag: string; size: number | null }): boolean {
    try {
      const p = this.partialPaths(meta.key);
      writeFileSync(`${p.meta}.${process.pid}.tmp`, JSON.stringify(meta));
      renameSync(`${p.meta}.${process.pid}.tmp`, p.meta);
      renameSync(tmp, p.data);
      log.debug(`kept ${statSync(p.data).size} bytes of ${meta.key} to resume`);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Take over the partial download saved for `key`, if any: it is renamed into a private temp file
   * first, so two processes can never append to the same one.
   */
  claimPartial(key: string): PartialDownload | null {
    const p = this.partialPaths(key);
    const tmp = this.newTmp();
    try {
      renameSync(p.data, tmp);
    } catch {
      return null;
    }
    try {
      const meta = v.parse(PartialMeta, JSON.parse(readFileSync(p.meta, "utf8")));
      rmSync(p.meta, { force: true });
      if (meta.key !== key) throw new Error("key mismatch");
      return { tmp, bytes: statSync(tmp).size, etag: meta.etag, size: meta.size };
    } catch {
      rmSync(tmp, { force: true });
      return null;
    }
  }

  /** Discard a claimed partial (the object changed, or the server will not resume). */
  dropPartial(p: PartialDownload): void {
    rmSync(p.tmp, { force: true });
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

  // ---- digest index -------------------------------------------------------------------------------

  private digestPath(key: string): string {
    return join(this.digestDir, `${sha256Hex(key)}.json`);
  }

  /** The digest remembered for bytes identified by `key` (no blob needs to be cached). A hit is
   * still checked when the bytes are read: a stale record fails that read, and is forgotten. */
  lookupDigest(key: string): { digest: string; size: number } | null {
    try {
      const r = v.safeParse(SourceRecord, JSON.parse(readFileSync(this.digestPath(key), "utf8")));
      return r.success && r.output.key === key ? { digest: r.output.digest, size: r.output.size } : null;
    } catch {
      return null; // none, or damaged: it only costs a hash
    }
  }

  recordDigest(key: string, digest: string, size: number): void {
    const p = this.digestPath(key);
    const tmp = `${p}.${process.pid}.tmp`;
    try {
      writeFileSync(tmp, JSON.stringify({ key, etag: null, size, digest, savedAt: new Date().toISOString() }));
      renameSync(tmp, p);
    } catch (e) {
      log.debug(`digest index: cannot record ${key}: ${(e as Error).message}`); // only costs a hash next time
    }
  }

  forgetDigest(key: string): void {
    rmSync(this.digestPath(key), { force: true });
  }

  private sweepTmp(): void {
    const now = Date.now();
    const old = [...readdirSync(this.tmpDir).map((n) => join(this.tmpDir, n)), ...readdirSync(this.partialDir).map((n) => join(this.partialDir, n))];
    for (const p of old) {
      try {
        if (now - statSync(p).mtimeMs > STALE_TMP_MS) rmSync(p, { force: true });
      } catch {
        // raced with another process
      }
    }
  }
}
