// A layer tar that is a local file, read for the applier with its sha256 computed in the same pass.
//
// Why not Bun.file().stream(): every chunk of that stream is a freshly allocated buffer, so each
// read page-faults its buffer in and the memory is handed back later — on a plain tar that costs
// more CPU than writing the files out. Here a few buffers are reused for the whole layer.
//
// Big files are read and hashed by a worker thread into a ring of shared buffers, so reading and
// hashing overlap the applier's work (two CPUs: GNU tar's wall time with the digest for free).
// The worker hashes a slot before publishing it and the applier never writes to it, so the digest
// is exactly that of the bytes applied. The same thread also writes the files out: the applier
// creates each file (every check stays on its thread) and queues the writes from the ring and the
// file's final metadata (file-out.ts), which the worker runs while the applier parses on — a slot
// is read again only once the writes queued from it ran. Small files are read on this thread and
// written by the applier: a worker's start-up would cost more than it saves (unless one is
// already up, from an earlier layer).
import { closeSync, openSync, readSync } from "node:fs";
import { getSystemErrorName } from "node:util";
import { type FileMeta, type FileOut, finishFd, OP_CLOSE, OP_END, OP_FIELDS, OP_WRITE, packMeta } from "./file-out.ts";

/** What the read found: filled in when the generator finishes cleanly. */
export interface FileReadResult {
  digest: string | null;
  size: number;
}

/** A failure reading the file (not the archive): applyLayer reports it as a source error. */
export class FileReadError extends Error {
  constructor(
    message: string,
    readonly code: string | undefined,
  ) {
    super(message);
  }
}

const SLOT = 1 << 20;
/** Slots in the ring: the reader can run this far ahead of the applier. */
const SLOTS = 16;
/** Queued file ops (writes, final metadata, closes) the worker may be behind by. */
const OP_CAP = 16384;
/** Longest blocking wait for a slot before the event loop gets a turn. */
const WAIT_MS = 20;
/** Slots applied between turns of the event loop when the reader is never waited for. */
const TICK_EVERY = 64;
/** Slots read ahead below which the applier writes file data itself (the reader is behind). */
const AHEAD_MIN = 2;
/** A full op queue that does not drain for this long means the worker is gone. */
const STUCK_MS = 60_000;

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));
/** Below this, reading on this thread beats starting (or waking) a worker. */
const WORKER_MIN_BYTES = 8 << 20;
/** With a worker already booted (an earlier layer's), handing it the writes pays from one slot up. */
const IDLE_WORKER_MIN_BYTES = 1 << 20;

// Control words. PRODUCED: slots the worker filled; CONSUMED: slots the applier is done with;
// CANCEL: the applier stopped early; OPS_HEAD / OPS_DONE: ops queued / run; WAKE: bumped (and
// notified) whenever the worker has something new to look at; FINISHED: every op is queued;
// W_ERRNO / W_ID / W_CALL: the first failed op (errno, file id, syscall). Then each slot's length
// (0 = end of file, -1 = error), then each slot's MARK: OPS_HEAD when the applier was done with it
// (ops before it may point into the slot, so they run before the slot is read into again).
const PRODUCED = 0;
const CONSUMED = 1;
const CANCEL = 2;
const OPS_HEAD = 3;
const OPS_DONE = 4;
const WAKE = 5;
const FINISHED = 6;
const W_ERRNO = 7;
const W_ID = 8;
const W_CALL = 9;
const LEN = 10;
const MARK = LEN + SLOTS;
/** Syscalls a queued op makes, by index in W_CALL. */
const CALLS = ["write", "ftruncate", "fchown", "fchmod", "futime", "close"];

const WORKER_SRC = `
const fs = require("node:fs");
const finishFd = (${finishFd.toString()});
self.onmessage = (e) => {
  const { id, path, data, ctrl: c, ops: o } = e.data;
  const ctrl = new Int32Array(c);
  const ops = new Float64Array(o);
  const buf = new Uint8Array(data);
  const h = new Bun.CryptoHasher("sha256");
  const slot = ${SLOT}, slots = ${SLOTS}, cap = ${OP_CAP}, F = ${OP_FIELDS};
  let produced = 0, size = 0, fd = -1, done = 0, eof = false, readError = null, skip = false;
  const publish = (n) => {
    ctrl[${LEN} + (produced % slots)] = n;
    Atomics.store(ctrl, ${PRODUCED}, ++produced);
    Atomics.notify(ctrl, ${PRODUCED});
  };
  // After a failure or a cancel, only the closes run: no fd is left open.
  const fail = (err, fileId) => {
    if (skip) return;
    skip = true;
    ctrl[${W_ID}] = fileId % cap;
    ctrl[${W_CALL}] = Math.max(0, ${JSON.stringify(CALLS)}.indexOf(err && err.syscall));
    Atomics.store(ctrl, ${W_ERRNO}, Math.abs((err && err.errno) || 5));
  };
  const run = (i) => {
    const b = (i % cap) * F;
    const kind = ops[b], ofd = ops[b + 1];
    try {
      if (kind === ${OP_WRITE}) {
        if (skip) return;
        let off = ops[b + 3], len = ops[b + 4], pos = ops[b + 5];
        while (len > 0) {
          const n = fs.writeSync(ofd, buf, off, len, pos);
          off += n; len -= n; pos += n;
        }
      } else if (kind === ${OP_END} && !skip) finishFd(fs, ofd, ops, b);
      else fs.closeSync(ofd);
    } catch (err) {
      fail(err, ops[b + 2]);
    }
  };
  const drain = (to) => {
    if (done >= to) return;
    while (done < to) run(done++);
    Atomics.store(ctrl, ${OPS_DONE}, done);
    Atomics.notify(ctrl, ${OPS_DONE});
  };
  const canRead = () => !eof && produced - Atomics.load(ctrl, ${CONSUMED}) < slots;
  const over = () => Atomics.load(ctrl, ${CANCEL}) || (eof && Atomics.load(ctrl, ${FINISHED}));
  const readSlot = () => {
    // the slot's previous contents may still be queued for writing
    if (produced >= slots) drain(ctrl[${MARK} + (produced % slots)]);
    const view = buf.subarray((produced % slots) * slot, (produced % slots + 1) * slot);
    let n;
    try {
      n = fs.readSync(fd, view, 0, slot, null);
    } catch (err) {
      readError = err;
      eof = true;
      publish(-1);
      return;
    }
    if (n > 0) h.update(view.subarray(0, n));
    size += n;
    if (n === 0) eof = true;
    publish(n);
  };
  try {
    try {
      fd = fs.openSync(path, "r");
    } catch (err) {
      readError = err;
      eof = true;
      publish(-1);
    }
    // Reading ahead first (the applier may be waiting for it), then the queued ops.
    while (!over()) {
      if (canRead()) {
        readSlot();
        continue;
      }
      const head = Atomics.load(ctrl, ${OPS_HEAD});
      if (done < head) {
        drain(Math.min(head, done + 256));
        continue;
      }
      const wake = Atomics.load(ctrl, ${WAKE});
      if (over() || canRead() || done < Atomics.load(ctrl, ${OPS_HEAD})) continue;
      Atomics.wait(ctrl, ${WAKE}, wake, 1000);
    }
    const cancelled = Atomics.load(ctrl, ${CANCEL}) === 1;
    if (cancelled) skip = true;
    drain(Atomics.load(ctrl, ${OPS_HEAD}));
    // closed before the report: the caller may go on to count its open files
    if (fd >= 0) fs.closeSync(fd);
    fd = -1;
    if (cancelled) postMessage({ id, cancelled: true });
    else if (readError) postMessage({ id, error: String((readError && readError.message) || readError), code: readError && readError.code });
    else postMessage({ id, digest: "sha256:" + h.digest("hex"), size });
  } finally {
    if (fd >= 0) fs.closeSync(fd);
  }
};
`;

interface Done {
  digest?: string;
  size?: number;
  error?: string;
  code?: string;
  cancelled?: boolean;
}

class ReaderWorker {
  private readonly w: Worker;
  readonly data = new SharedArrayBuffer(SLOT * SLOTS);
  readonly ctrl = new Int32Array(new SharedArrayBuffer(4 * (MARK + SLOTS)));
  readonly ops = new Float64Array(new SharedArrayBuffer(8 * OP_FIELDS * OP_CAP));
  private seq = 0;
  private waiting: ((d: Done) => void) | null = null;
  broken: Error | null = null;

  constructor() {
    this.w = new Worker(URL.createObjectURL(new Blob([WORKER_SRC], { type: "application/javascript" })));
    this.w.onmessage = (m: MessageEvent<Done>) => this.settle(m.data);
    this.w.onerror = (e) => {
      this.broken = new Error(`the reader thread failed: ${e.message}`);
      this.settle({ error: this.broken.message });
    };
    this.w.unref();
  }

  private settle(d: Done): void {
    const f = this.waiting;
    this.waiting = null;
    f?.(d);
  }

  /** Start reading `path`; the returned promise settles when the worker is done with it. */
  start(path: string): Promise<Done> {
    this.ctrl.fill(0);
    const id = ++this.seq;
    const done = new Promise<Done>((resolve) => {
      this.waiting = resolve;
    });
    this.w.postMessage({ id, path, data: this.data, ctrl: this.ctrl.buffer, ops: this.ops.buffer });
    return done;
  }

  /** Something changed that the worker may be waiting for. */
  wake(): void {
    Atomics.add(this.ctrl, WAKE, 1);
    Atomics.notify(this.ctrl, WAKE);
  }

  /** Set a control word and wake the worker. */
  signal(word: number): void {
    Atomics.store(this.ctrl, word, 1);
    this.wake();
  }
}

/** Idle workers: one per layer read at a time (normally one), kept for the next layer. */
const idle: ReaderWorker[] = [];

/**
 * Start a reader thread now (it takes 10-100 ms to boot) when a caller knows big local tars are
 * coming, so the boot overlaps its other work instead of the first layer's.
 */
export function warmFileReader(): void {
  if (idle.length === 0) idle.push(new ReaderWorker());
}

/** A layer file's chunks, and where the applier sends its regular files (null: it writes them). */
export interface FileSource {
  chunks: AsyncGenerator<Buffer>;
  out: FileOut | null;
}

/**
 * Chunks of the file at `path`, hashed as they are read; `res` gets the digest and size once the
 * whole file was read. A chunk is valid until the next one is asked for (its buffer is reused).
 */
export function fileSource(path: string, size: number, res: FileReadResult): FileSource {
  if (size < (idle.length > 0 ? IDLE_WORKER_MIN_BYTES : WORKER_MIN_BYTES)) return { chunks: localChunks(path, res), out: null };
  const out = new RingOut();
  return { chunks: ringChunks(path, out, res), out };
}

/** The file ops the applier queues for the worker of the layer being read. */
class RingOut implements FileOut {
  private w: ReaderWorker | null = null;
  private ops: Float64Array<ArrayBufferLike> = new Float64Array(0);
  private head = 0;
  private nextId = 0;
  private readonly names: string[] = new Array(OP_CAP);
  private failed: { name: string; error: Error } | null = null;

  /** The worker's session on this layer starts: ops go to it until detach(). */
  attach(w: ReaderWorker): void {
    this.w = w;
    this.ops = w.ops;
    this.head = 0;
  }

  /** The worker ran every op (or was cancelled): from now on nothing is queued. */
  detach(): void {
    this.failure(); // kept: the worker's control words are reset for its next layer
    this.w = null;
  }

  /** OPS_HEAD now: every op before it was queued. */
  get queued(): number {
    return this.head;
  }

  begin(name: string): number {
    const id = this.nextId++;
    this.names[id % OP_CAP] = name;
    return id;
  }

  write(fd: number, id: number, buf: Buffer, off: number, len: number, pos: number): boolean {
    const w = this.w;
    if (w === null || buf.buffer !== w.data) throw new Error("file data queued from outside the reader's ring");
    // The reader has (almost) nothing read ahead: it is the thread behind, so the applier writes
    // this itself (big files mostly: there the reader's read + hash + write outweigh the applier's
    // parsing). The pwrite goes to its own offset: the order of the two threads' writes is free.
    if (Atomics.load(w.ctrl, PRODUCED) - Atomics.load(w.ctrl, CONSUMED) < AHEAD_MIN) return false;
    const b = this.reserve(w);
    const ops = this.ops;
    ops[b] = OP_WRITE;
    ops[b + 1] = fd;
    ops[b + 2] = id;
    ops[b + 3] = buf.byteOffset + off;
    ops[b + 4] = len;
    ops[b + 5] = pos;
    this.commit(w);
    return true;
  }

  end(fd: number, id: number, meta: FileMeta): void {
    const w = this.w;
    if (w === null) throw new Error("file metadata queued with no reader thread");
    const b = this.reserve(w);
    this.ops[b] = OP_END;
    this.ops[b + 1] = fd;
    this.ops[b + 2] = id;
    packMeta(this.ops, b, meta);
    this.commit(w);
  }

  close(fd: number): void {
    const w = this.w;
    if (w === null) {
      // the worker is done with every queued op: nothing of this fd is pending
      closeSync(fd);
      return;
    }
    const b = this.reserve(w);
    this.ops[b] = OP_CLOSE;
    this.ops[b + 1] = fd;
    this.ops[b + 2] = -1;
    this.commit(w);
  }

  failure(): { name: string; error: Error } | null {
    if (this.failed !== null) return this.failed;
    const w = this.w;
    const errno = w === null ? 0 : Atomics.load(w.ctrl, W_ERRNO);
    if (errno === 0 || w === null) return null;
    const code = getSystemErrorName(-errno);
    const syscall = CALLS[w.ctrl[W_CALL]!] ?? "write";
    const error = Object.assign(new Error(`${code}: ${syscall} failed`), { code, errno: -errno, syscall });
    this.failed = { name: this.names[w.ctrl[W_ID]!] ?? "?", error };
    return this.failed;
  }

  /** Index of a free op record, waiting for the worker when the queue is full. */
  private reserve(w: ReaderWorker): number {
    if (this.head - Atomics.load(w.ctrl, OPS_DONE) >= OP_CAP) {
      w.wake();
      const t0 = performance.now();
      for (;;) {
        const done = Atomics.load(w.ctrl, OPS_DONE);
        if (this.head - done < OP_CAP) break;
        if (performance.now() - t0 > STUCK_MS) throw new FileReadError("the reader thread stopped writing files", undefined);
        Atomics.wait(w.ctrl, OPS_DONE, done, WAIT_MS);
      }
    }
    return (this.head % OP_CAP) * OP_FIELDS;
  }

  private commit(w: ReaderWorker): void {
    Atomics.store(w.ctrl, OPS_HEAD, ++this.head);
  }
}

async function* ringChunks(path: string, ring: RingOut, out: FileReadResult): AsyncGenerator<Buffer> {
  const w = idle.pop() ?? new ReaderWorker();
  const { ctrl } = w;
  const done = w.start(path);
  ring.attach(w);
  let consumed = 0;
  let finished = false;
  try {
    for (;;) {
      if (Atomics.load(ctrl, PRODUCED) === consumed) {
        if (w.broken) throw new FileReadError(w.broken.message, undefined);
        // A blocking wait wakes as soon as the slot is published (waitAsync goes through the
        // event loop: measured several ms per chunk); it is short, and the loop runs in between.
        if (Atomics.wait(ctrl, PRODUCED, consumed, WAIT_MS) === "timed-out") await tick();
        continue;
      }
      const n = ctrl[LEN + (consumed % SLOTS)]!;
      if (n <= 0) {
        // every op is queued: the worker runs them all, then reports
        w.signal(FINISHED);
        const d = await done;
        finished = true;
        if (n < 0 || d.error !== undefined) throw new FileReadError(d.error ?? "read failed", d.code);
        out.digest = d.digest!;
        out.size = d.size!;
        return;
      }
      yield Buffer.from(w.data, (consumed % SLOTS) * SLOT, n);
      ctrl[MARK + (consumed % SLOTS)] = ring.queued;
      Atomics.store(ctrl, CONSUMED, ++consumed);
      w.wake();
      if (consumed % TICK_EVERY === 0) await tick(); // timers and signals get their turn
    }
  } finally {
    if (!finished) {
      w.signal(CANCEL);
      await done;
    }
    ring.detach();
    if (!w.broken) idle.push(w);
  }
}

async function* localChunks(path: string, out: FileReadResult): AsyncGenerator<Buffer> {
  const h = new Bun.CryptoHasher("sha256");
  const buf = Buffer.allocUnsafe(SLOT);
  let size = 0;
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (e) {
    throw asReadError(e);
  }
  try {
    for (;;) {
      let n: number;
      try {
        n = readSync(fd, buf, 0, SLOT, null);
      } catch (e) {
        throw asReadError(e);
      }
      if (n === 0) break;
      const chunk = buf.subarray(0, n);
      h.update(chunk);
      size += n;
      yield chunk;
    }
  } finally {
    closeSync(fd);
  }
  out.digest = `sha256:${h.digest("hex")}`;
  out.size = size;
}

function asReadError(e: unknown): FileReadError {
  const err = e as NodeJS.ErrnoException;
  return new FileReadError(err?.message ?? String(e), err?.code);
}
