// Streamed downloads of a remote layer family: each object is fetched once into the blob cache (temp
// file, hashed, fsync'ed, renamed — BlobCache.ingest, resumable like any download) while its reader
// follows the growing file, so a layer is applied while it downloads. Reading layer N starts the
// downloads of the next `readAhead` layers (they will be built too: a layer on top of a new one is
// new), and no more: the read-ahead is bounded by layers, and the bytes wait on disk, never in
// memory. A reader reaches EOF only after its download completed and was verified (size, ETag pin)
// and its digest is known, so a layer is never committed from bytes its digest does not name.
import { closeSync, openSync, readSync } from "node:fs";
import { ThinimgError } from "../../errors.ts";
import type { BlobCache } from "../cache.ts";
import { type Downloaded, type DownloadOptions, download } from "./download.ts";

/** One object's transfer, as a reader sees it. */
class Transfer {
  /** File holding the bytes so far (a temp file, or the cached blob), and how many are written. */
  path: string | null = null;
  written = 0;
  result: Downloaded | null = null;
  error: unknown = null;
  readonly done: Promise<Downloaded>;
  private wake: (() => void)[] = [];

  constructor(cache: BlobCache, o: DownloadOptions) {
    this.done = download(cache, {
      ...o,
      onTmp: (path, bytes) => {
        this.path = path;
        this.written = bytes;
        this.notify();
      },
      onProgress: (p) => {
        this.written = p.bytes;
        o.onProgress?.(p);
        this.notify();
      },
    }).then(
      (r) => {
        this.result = r;
        this.notify();
        return r;
      },
      (e: unknown) => {
        this.error = e;
        this.notify();
        throw e;
      },
    );
    this.done.catch(() => {}); // reported to whoever reads or awaits it
  }

  private notify(): void {
    const w = this.wake;
    this.wake = [];
    for (const f of w) f();
  }

  changed(): Promise<void> {
    return new Promise((resolve) => this.wake.push(resolve));
  }
}

const CHUNK = 1024 * 1024;

/** The object's bytes as they arrive: follows the temp file (re-opened when a retry resumes into a
 * new one), ends when the download is complete, errors with the download's error. Reads are made a
 * MiB at a time (while the download is running, once a MiB is there), synchronously: the bytes were
 * just written, so they come from the page cache, and a thread-pool hop per read costs more. */
function follow(t: Transfer): ReadableStream<Uint8Array> {
  let fd: number | null = null;
  let path: string | null = null;
  let pos = 0;
  const close = () => {
    if (fd !== null) closeSync(fd);
    fd = null;
  };
  return new ReadableStream<Uint8Array>(
    {
      async pull(c) {
        for (;;) {
          if (t.error) {
            close();
            throw t.error;
          }
          // the final blob once complete (also a cache hit, which has no temp file); else the temp file
          const done = t.result !== null;
          const want = t.result ? t.result.path : t.path;
          const limit = t.result ? t.result.size : t.written;
          if (want !== null && want !== path) {
            close();
            fd = openSync(want, "r");
            path = want;
          }
          if (fd !== null && (limit - pos >= CHUNK || (done && pos < limit))) {
            const buf = new Uint8Array(Math.min(CHUNK, limit - pos));
            const n = readSync(fd, buf, 0, buf.length, pos);
            if (n === 0) throw new ThinimgError("internal", `${path}: shorter than the ${limit} bytes written`);
            pos += n;
            c.enqueue(n === buf.length ? buf : buf.subarray(0, n));
            return;
          }
          if (done && pos >= limit) {
            close();
            c.close();
            return;
          }
          await t.changed();
        }
      },
      cancel: close,
    },
    { highWaterMark: 0 },
  );
}

export interface StreamedObject {
  /** Download options of the object (URL, cache key, ETag/size pin, …). */
  download: DownloadOptions;
}

/** The objects of a family in apply order, each fetched at most once, on demand plus read-ahead. */
export class StreamedFamily {
  private readonly transfers: (Transfer | undefined)[];

  constructor(
    private readonly cache: BlobCache,
    private readonly objects: StreamedObject[],
    private readonly readAhead = 1,
  ) {
    this.transfers = new Array(objects.length);
  }

  /** How many transfers were started (tests: the read-ahead bound). */
  get started(): number {
    return this.transfers.filter(Boolean).length;
  }

  private start(i: number): Transfer {
    let t = this.transfers[i];
    if (!t) {
      t = new Transfer(this.cache, this.objects[i]!.download);
      this.transfers[i] = t;
    }
    return t;
  }

  /** Start object i's download and the read-ahead's (an apply is about to need them). */
  prefetch(i: number): void {
    for (let j = i; j < Math.min(this.objects.length, i + 1 + this.readAhead); j++) this.start(j);
  }

  /** Object i's bytes, as they arrive. */
  open(i: number): ReadableStream<Uint8Array> {
    this.prefetch(i);
    return follow(this.start(i));
  }

  /** Object i, complete in the cache. */
  fetched(i: number): Promise<Downloaded> {
    return this.start(i).done;
  }
}
