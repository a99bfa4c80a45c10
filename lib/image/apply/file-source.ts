// A layer tar that is a local file, read for the applier with its sha256 computed in the same pass.
//
// Why not Bun.file().stream(): every chunk of that stream is a freshly allocated buffer, so each
// read page-faults its buffer in and the memory is handed back later — on a plain tar that costs
// more CPU than writing the files out. Here a few buffers are reused for the whole layer.
//
// Big files are read and hashed by a worker thread into a ring of shared buffers, so reading and
// hashing overlap the applier's writes (two CPUs: GNU tar's wall time with the digest for free).
// The worker hashes a slot before publishing it and the applier never writes to it, so the digest
// is exactly that of the bytes applied. Small files are read on this thread: a worker's start-up
// would cost more than it saves.
import { closeSync, openSync, readSync } from "node:fs";

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
const SLOTS = 8;
/** Longest blocking wait for a slot before the event loop gets a turn. */
const WAIT_MS = 20;
/** Slots applied between turns of the event loop when the reader is never waited for. */
const TICK_EVERY = 64;

const tick = () => new Promise<void>((resolve) => setImmediate(resolve));
/** Below this, reading on this thread beats starting (or waking) a worker. */
const WORKER_MIN_BYTES = 8 << 20;

// Control words: [PRODUCED] slots the worker filled, [CONSUMED] slots the applier is done with,
// [CANCEL] the applier stopped early, then each slot's length (0 = end of file, -1 = error).
const PRODUCED = 0;
const CONSUMED = 1;
const CANCEL = 2;
const LEN = 3;

const WORKER_SRC = `
const { openSync, readSync, closeSync } = require("node:fs");
self.onmessage = (e) => {
  const { id, path, data, ctrl: c, slot, slots } = e.data;
  const ctrl = new Int32Array(c);
  const buf = new Uint8Array(data);
  const h = new Bun.CryptoHasher("sha256");
  let produced = 0, size = 0, fd = -1;
  const publish = (n) => {
    ctrl[${LEN} + (produced % slots)] = n;
    Atomics.store(ctrl, ${PRODUCED}, ++produced);
    Atomics.notify(ctrl, ${PRODUCED});
  };
  try {
    fd = openSync(path, "r");
    for (;;) {
      while (produced - Atomics.load(ctrl, ${CONSUMED}) >= slots) {
        if (Atomics.load(ctrl, ${CANCEL})) break;
        Atomics.wait(ctrl, ${CONSUMED}, produced - slots, 1000);
      }
      if (Atomics.load(ctrl, ${CANCEL})) { postMessage({ id, cancelled: true }); return; }
      const view = buf.subarray((produced % slots) * slot, (produced % slots + 1) * slot);
      const n = readSync(fd, view, 0, slot, null);
      if (n > 0) h.update(view.subarray(0, n));
      size += n;
      publish(n);
      if (n === 0) break;
    }
    postMessage({ id, digest: "sha256:" + h.digest("hex"), size });
  } catch (err) {
    publish(-1);
    postMessage({ id, error: String(err && err.message || err), code: err && err.code });
  } finally {
    if (fd >= 0) closeSync(fd);
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
  readonly ctrl = new Int32Array(new SharedArrayBuffer(4 * (LEN + SLOTS)));
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
    this.w.postMessage({ id, path, data: this.data, ctrl: this.ctrl.buffer, slot: SLOT, slots: SLOTS });
    return done;
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

/**
 * Chunks of the file at `path`, hashed as they are read; `out` gets the digest and size once the
 * whole file was read. A chunk is valid until the next one is asked for (its buffer is reused).
 */
export async function* fileChunks(path: string, size: number, out: FileReadResult): AsyncGenerator<Buffer> {
  if (size < WORKER_MIN_BYTES) {
    yield* localChunks(path, out);
    return;
  }
  const w = idle.pop() ?? new ReaderWorker();
  const { ctrl } = w;
  const done = w.start(path);
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
        const d = await done;
        finished = true;
        if (n < 0 || d.error !== undefined) throw new FileReadError(d.error ?? "read failed", d.code);
        out.digest = d.digest!;
        out.size = d.size!;
        return;
      }
      yield Buffer.from(w.data, (consumed % SLOTS) * SLOT, n);
      Atomics.store(ctrl, CONSUMED, ++consumed);
      Atomics.notify(ctrl, CONSUMED);
      if (consumed % TICK_EVERY === 0) await tick(); // timers and signals get their turn
    }
  } finally {
    if (!finished) {
      Atomics.store(ctrl, CANCEL, 1);
      Atomics.notify(ctrl, CONSUMED);
      await done;
    }
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
