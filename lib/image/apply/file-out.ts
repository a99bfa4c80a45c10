// How a regular file's data and final metadata leave the applier. By default the applier writes
// them itself; when the layer is read by the reader thread (file-source.ts), the data already sits
// in that thread's shared ring, so the applier only creates the file (the namespace work: open,
// with every check) and queues the rest — the writes, owner, mode, times and close — for that
// thread, which runs them while this one parses the next entries. GNU tar does all of it on one
// thread; splitting it is what brings the plain-tar wall time under tar's.
//
// One function, finishFd, sets a file's final metadata on both threads: its source is handed to
// the reader thread as text, so it must stay self-contained (no imports, no module constants).

/** A file created by the applier whose data and metadata go through a FileOut. */
export interface FileOut {
  /** A new file is being written: its id for the calls below (and for naming it in an error). */
  begin(name: string): number;
  /**
   * Queue `len` bytes of `buf` (a slice of the ring) at file offset `pos`; false when the caller
   * should write them itself (the other thread is the one behind). Either way they are written
   * before the file's end() runs.
   */
  write(fd: number, id: number, buf: Buffer, off: number, len: number, pos: number): boolean;
  /** Queue the file's final metadata (ending with close): fields as in END_FIELDS. */
  end(fd: number, id: number, meta: FileMeta): void;
  /** Close an fd whose file will not be finished (the layer failed). */
  close(fd: number): void;
  /** A queued write or metadata call that failed: the file's name and an errno-style error. */
  failure(): { name: string; error: Error } | null;
}

export interface FileMeta {
  /** chown to uid:gid (owner first: chown clears setuid/setgid and security.capability). */
  chown: boolean;
  uid: number;
  gid: number;
  mode: number;
  /** Seconds, may be negative (before 1970). */
  atime: number;
  mtime: number;
  /** Apparent size of a sparse file (its holes were never written), else -1. */
  truncate: number;
}

/** An op record: [kind, fd, id, then the kind's fields], float64 each. */
export const OP_FIELDS = 10;
export const OP_WRITE = 1;
export const OP_END = 2;
export const OP_CLOSE = 3;

/** Store `m` in an op record at `b` (fields 3..9, the layout finishFd reads). */
export function packMeta(ops: Float64Array<ArrayBufferLike>, b: number, m: FileMeta): void {
  ops[b + 3] = m.chown ? 1 : 0;
  ops[b + 4] = m.uid;
  ops[b + 5] = m.gid;
  ops[b + 6] = m.mode;
  ops[b + 7] = m.atime;
  ops[b + 8] = m.mtime;
  ops[b + 9] = m.truncate;
}

interface FdCalls {
  ftruncateSync(fd: number, len: number): void;
  fchownSync(fd: number, uid: number, gid: number): void;
  fchmodSync(fd: number, mode: number): void;
  futimesSync(fd: number, atime: number | Date, mtime: number | Date): void;
  closeSync(fd: number): void;
}

/**
 * Final metadata of the file open at `fd` (record at ops[b], see packMeta), then close it:
 * size of a sparse file, owner, mode, `between` (xattrs: after chown, which would clear
 * security.capability), times last. Self-contained: its source runs on the reader thread too.
 */
export function finishFd(fs: FdCalls, fd: number, ops: Float64Array<ArrayBufferLike>, b: number, between?: (fd: number) => void): void {
  // node:fs turns a negative number of seconds into "now"; a Date keeps times before 1970.
  const ts = (s: number): number | Date => (s < 0 ? new Date(s * 1000) : s);
  try {
    if (ops[b + 9]! >= 0) fs.ftruncateSync(fd, ops[b + 9]!);
    if (ops[b + 3] === 1) fs.fchownSync(fd, ops[b + 4]!, ops[b + 5]!);
    fs.fchmodSync(fd, ops[b + 6]!);
    between?.(fd);
    fs.futimesSync(fd, ts(ops[b + 7]!), ts(ops[b + 8]!));
  } finally {
    fs.closeSync(fd);
  }
}
