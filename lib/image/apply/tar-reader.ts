// A push-based tar reader for layer application: 512-byte headers (ustar, GNU, star, v7), PAX
// extended headers with raw binary values, GNU long names. Synchronous and allocation-light: file
// data is handed to the sink as slices of the input chunks, never copied.
//
// Why not node-tar's Parser (which the project otherwise uses): it drops PAX `SCHILY.xattr.*`
// records (so `security.capability` would be lost), decodes PAX bodies as UTF-8 text (binary xattr
// values would be mangled anyway), ignores devmajor/devminor in GNU-format headers, and turns a
// corrupt header into a warning and carries on. Interpretation follows Go's archive/tar, which is
// what builds and unpacks most images (docker, containerd, umoci, buildkit) — see docs/layer-apply.md.

export type EntryType = "file" | "link" | "symlink" | "char" | "block" | "dir" | "fifo";

export interface TarEntry {
  /** Path as written in the archive (after PAX `path` / GNU long name), not normalised. */
  name: string;
  /** Link target as written (symlink or hardlink). */
  linkname: string;
  type: EntryType;
  /** Permission bits incl. setuid/setgid/sticky (file-type bits masked off). */
  mode: number;
  uid: number;
  gid: number;
  /** Data bytes that follow (non-zero only for regular files). */
  size: number;
  /** Seconds since the epoch, may be fractional (PAX). */
  mtime: number;
  atime: number | null;
  devmajor: number;
  devminor: number;
  /** Extended attributes from PAX SCHILY.xattr.* / LIBARCHIVE.xattr.*; null when none. */
  xattrs: Map<string, Buffer> | null;
  /** Stream offset of this entry's header block. */
  offset: number;
}

export interface TarSink {
  /** A header. For type "file", exactly `size` bytes of data() follow, then fileEnd(). */
  entry(e: TarEntry): void;
  data(buf: Buffer, off: number, len: number): void;
  fileEnd(): void;
}

/**
 * Malformed archive. `entry` names the entry at fault when `inEntry`, else the last good entry
 * before the damage (null at the start).
 */
export class TarFormatError extends Error {
  constructor(
    message: string,
    readonly offset: number,
    readonly entry: string | null,
    readonly inEntry = false,
  ) {
    super(message);
    this.name = "TarFormatError";
  }
}

/** Largest PAX / GNU long-name body accepted (one entry's metadata, not file data). */
export const MAX_META_BYTES = 1024 * 1024;

const BLOCK = 512;

type State = "header" | "data" | "skip" | "meta" | "eof";
type MetaKind = "pax" | "gpax" | "longname" | "longlink";

interface Pending {
  path?: string;
  linkpath?: string;
  size?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
  atime?: number;
  devmajor?: number;
  devminor?: number;
  xattrs?: Map<string, Buffer>;
  longName?: string;
  longLink?: string;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

export class TarReader {
  private state: State = "header";
  private hdr = Buffer.alloc(BLOCK);
  private hdrFill = 0;
  private remain = 0; // bytes left in data / skip / meta
  private pad = 0; // padding to skip after data or meta
  private padOnly = false; // the current "skip" is block padding, not an ignored body
  private metaKind: MetaKind = "pax";
  private meta: Buffer | null = null;
  private metaFill = 0;
  private pending: Pending = {};
  private zeroBlocks = 0;
  private lastName: string | null = null;
  /** Stream bytes consumed so far. */
  offset = 0;
  /** True once the end-of-archive marker was read (two zero blocks). */
  sawEof = false;

  constructor(private readonly sink: TarSink) {}

  push(chunk: Buffer): void {
    let pos = 0;
    const len = chunk.length;
    while (pos < len) {
      switch (this.state) {
        case "header": {
          if (this.hdrFill === 0 && len - pos >= BLOCK) {
            this.offset += BLOCK;
            pos += BLOCK;
            this.header(chunk, pos - BLOCK);
          } else {
            const n = Math.min(BLOCK - this.hdrFill, len - pos);
            chunk.copy(this.hdr, this.hdrFill, pos, pos + n);
            this.hdrFill += n;
            pos += n;
            this.offset += n;
            if (this.hdrFill === BLOCK) {
              this.hdrFill = 0;
              this.header(this.hdr, 0);
            }
          }
          break;
        }
        case "data": {
          const n = Math.min(this.remain, len - pos);
          this.sink.data(chunk, pos, n);
          pos += n;
          this.offset += n;
          this.remain -= n;
          if (this.remain === 0) {
            this.sink.fileEnd();
            this.afterBody();
          }
          break;
        }
        case "skip": {
          const n = Math.min(this.remain, len - pos);
          pos += n;
          this.offset += n;
          this.remain -= n;
          if (this.remain === 0) this.afterBody();
          break;
        }
        case "meta": {
          const n = Math.min(this.remain, len - pos);
          chunk.copy(this.meta!, this.metaFill, pos, pos + n);
          this.metaFill += n;
          pos += n;
          this.offset += n;
          this.remain -= n;
          if (this.remain === 0) {
            this.metaDone();
            this.afterBody();
          }
          break;
        }
        case "eof":
          // Trailing bytes after the end marker (record padding) are read, not interpreted.
          this.offset += len - pos;
          pos = len;
          break;
      }
    }
  }

  /** The input ended. Throws on truncation; a missing end marker is accepted (as Go does). */
  end(): void {
    if (this.state === "eof") return;
    if (this.state === "header" && this.hdrFill === 0) {
      if (this.hasPending()) this.fail("archive ends after an extended header, before its entry");
      return;
    }
    if (this.state === "header") this.fail(`truncated archive: partial header block (${this.hdrFill} of 512 bytes)`);
    if (this.state === "data") this.fail(`truncated archive: file data ends ${this.remain} bytes early`, this.offset, true);
    if (this.state === "meta") this.fail(`truncated archive: extended header ends ${this.remain} bytes early`);
    // Only block padding is missing after the last entry: GNU tar and Go both accept this.
    if (this.state === "skip" && this.padOnly) return;
    this.fail(`truncated archive: ${this.remain} bytes missing`);
  }

  private hasPending(): boolean {
    const p = this.pending;
    for (const k in p) if ((p as Record<string, unknown>)[k] !== undefined) return true;
    return false;
  }

  private fail(msg: string, offset = this.offset, inEntry = false): never {
    throw new TarFormatError(msg, offset, this.lastName, inEntry);
  }

  private afterBody(): void {
    if (this.pad > 0) {
      this.remain = this.pad;
      this.pad = 0;
      this.padOnly = true;
      this.state = "skip";
    } else {
      this.state = "header";
    }
  }

  private header(b: Buffer, o: number): void {
    const at = this.offset - BLOCK;
    if (b[o] === 0 && b[o + 148] === 0 && isZero(b, o)) {
      this.zeroBlocks++;
      if (this.zeroBlocks === 2) {
        if (this.hasPending()) this.fail("archive ends after an extended header, before its entry", at);
        this.state = "eof";
        this.sawEof = true;
      }
      return;
    }
    if (this.zeroBlocks > 0) this.fail("corrupt archive: a lone zero block inside the archive", at - BLOCK);

    const cksum = parseOctal(b, o + 148, 8);
    if (cksum === null || !checksumOk(b, o, cksum)) {
      this.fail(at === 0 ? "not a tar archive (header checksum mismatch at offset 0)" : `corrupt tar header at offset ${at} (checksum mismatch)`, at);
    }

    const flag = b[o + 156]!;
    const magic = b.toString("latin1", o + 257, o + 263);
    const ustar = magic === "ustar\0";
    const gnu = magic === "ustar ";

    const size = this.num(b, o + 124, 12, "size", at);
    const p = this.pending;

    switch (flag) {
      case 0x78: // 'x' PAX extended header (next entry)
      case 0x67: // 'g' PAX global header
        this.startMeta(flag === 0x78 ? "pax" : "gpax", size, at);
        return;
      case 0x4c: // 'L' GNU long name
        this.startMeta("longname", size, at);
        return;
      case 0x4b: // 'K' GNU long link name
        this.startMeta("longlink", size, at);
        return;
      case 0x56: // 'V' GNU volume header: not a file
        this.skipBody(size);
        return;
    }

    let name: string;
    if (p.longName !== undefined) name = p.longName;
    else if (p.path !== undefined) name = p.path;
    else {
      name = this.str(b, o, 100, at);
      if (ustar) {
        // star puts atime/ctime at 476..500 and "tar\0" at 508; its prefix is 131 bytes.
        const star = b[o + 508] === 0x74 && b[o + 509] === 0x61 && b[o + 510] === 0x72 && b[o + 511] === 0;
        const prefix = this.str(b, o + 345, star ? 131 : 155, at);
        if (prefix.length > 0) name = `${prefix}/${name}`;
      }
    }
    this.lastName = name;

    let type: EntryType;
    let dataSize = 0;
    let skip = 0;
    switch (flag) {
      case 0x30: // '0'
      case 0x37: // '7' contiguous
        type = "file";
        break;
      case 0: // old-style regular file; a trailing slash meant a directory (v7)
        type = name.endsWith("/") ? "dir" : "file";
        break;
      case 0x31:
        type = "link";
        break;
      case 0x32:
        type = "symlink";
        break;
      case 0x33:
        type = "char";
        break;
      case 0x34:
        type = "block";
        break;
      case 0x35:
        type = "dir";
        break;
      case 0x36:
        type = "fifo";
        break;
      case 0x44: // 'D' GNU dump dir: a directory whose data (a listing) is skipped
        type = "dir";
        skip = size;
        break;
      case 0x53:
        this.fail("GNU sparse files are not supported", at, true);
        break;
      default:
        this.fail(`unsupported entry type '${printable(flag)}'`, at, true);
    }
    if (type === "file") dataSize = p.size ?? size;

    let linkname = "";
    if (type === "link" || type === "symlink") {
      if (p.longLink !== undefined) linkname = p.longLink;
      else if (p.linkpath !== undefined) linkname = p.linkpath;
      else linkname = this.str(b, o + 157, 100, at);
    }

    let devmajor = 0;
    let devminor = 0;
    if (type === "char" || type === "block") {
      if (ustar || gnu) {
        devmajor = this.num(b, o + 329, 8, "devmajor", at);
        devminor = this.num(b, o + 337, 8, "devminor", at);
      }
      if (p.devmajor !== undefined) devmajor = p.devmajor;
      if (p.devminor !== undefined) devminor = p.devminor;
    }

    let atime: number | null = p.atime ?? null;
    if (atime === null && gnu) {
      const a = this.num(b, o + 345, 12, "atime", at);
      if (a !== 0) atime = a;
    }

    const entry: TarEntry = {
      name,
      linkname,
      type,
      mode: this.num(b, o + 100, 8, "mode", at) & 0o7777,
      uid: p.uid ?? this.num(b, o + 108, 8, "uid", at),
      gid: p.gid ?? this.num(b, o + 116, 8, "gid", at),
      size: dataSize,
      mtime: p.mtime ?? this.num(b, o + 136, 12, "mtime", at, true),
      atime,
      devmajor,
      devminor,
      xattrs: p.xattrs ?? null,
      offset: at,
    };
    this.pending = {};
    this.sink.entry(entry);

    if (type === "file") {
      if (dataSize === 0) {
        this.sink.fileEnd();
        this.state = "header";
      } else {
        this.remain = dataSize;
        this.pad = padOf(dataSize);
        this.state = "data";
      }
    } else {
      this.skipBody(skip);
    }
  }

  private skipBody(size: number): void {
    const total = size + padOf(size);
    if (total === 0) {
      this.state = "header";
    } else {
      this.remain = total;
      this.pad = 0;
      this.padOnly = false;
      this.state = "skip";
    }
  }

  private startMeta(kind: MetaKind, size: number, at: number): void {
    if (size > MAX_META_BYTES) {
      this.fail(`extended header of ${size} bytes exceeds the ${MAX_META_BYTES}-byte limit`, at);
    }
    this.metaKind = kind;
    if (size === 0) {
      this.meta = Buffer.alloc(0);
      this.metaFill = 0;
      this.metaDone();
      this.state = "header";
      return;
    }
    this.meta = Buffer.allocUnsafe(size);
    this.metaFill = 0;
    this.remain = size;
    this.pad = padOf(size);
    this.state = "meta";
  }

  private metaDone(): void {
    const body = this.meta!;
    this.meta = null;
    const at = this.offset - body.length;
    switch (this.metaKind) {
      case "longname":
        this.pending.longName = this.str(body, 0, body.length, at);
        if (this.pending.longName === "") this.fail("empty GNU long name", at);
        break;
      case "longlink":
        this.pending.longLink = this.str(body, 0, body.length, at);
        break;
      case "pax":
        parsePax(body, this.pending, (m) => this.fail(m, at));
        break;
      case "gpax":
        // Global headers are validated and otherwise ignored, as containerd does.
        parsePax(body, {}, (m) => this.fail(m, at));
        break;
    }
  }

  private str(b: Buffer, start: number, len: number, at: number): string {
    let end = start;
    const max = start + len;
    let ascii = true;
    while (end < max) {
      const c = b[end]!;
      if (c === 0) break;
      if (c >= 0x80) ascii = false;
      end++;
    }
    if (ascii) return b.toString("latin1", start, end);
    try {
      return utf8.decode(b.subarray(start, end));
    } catch {
      return this.fail("a file name is not valid UTF-8", at);
    }
  }

  private num(b: Buffer, off: number, len: number, field: string, at: number, signed = false): number {
    const first = b[off]!;
    if (first & 0x80) {
      // base-256 (GNU/star): 0x80 positive, 0xff negative
      const neg = first === 0xff;
      if (!neg && first !== 0x80) this.fail(`corrupt tar header at offset ${at} (bad ${field})`, at);
      let v = 0;
      for (let i = off + 1; i < off + len; i++) {
        v = v * 256 + (neg ? 0xff - b[i]! : b[i]!);
        if (v > Number.MAX_SAFE_INTEGER) this.fail(`corrupt tar header at offset ${at} (${field} too large)`, at);
      }
      if (neg) {
        if (!signed) this.fail(`corrupt tar header at offset ${at} (negative ${field})`, at);
        return -(v + 1);
      }
      return v;
    }
    const v = parseOctal(b, off, len);
    if (v === null) this.fail(`corrupt tar header at offset ${at} (bad ${field})`, at);
    return v;
  }
}

const padOf = (n: number): number => (BLOCK - (n % BLOCK)) % BLOCK;

function isZero(b: Buffer, o: number): boolean {
  for (let i = o; i < o + BLOCK; i++) if (b[i] !== 0) return false;
  return true;
}

/** Octal with optional leading spaces/NULs, terminated by NUL or space; null when malformed. */
function parseOctal(b: Buffer, off: number, len: number): number | null {
  let i = off;
  const end = off + len;
  while (i < end && (b[i] === 0x20 || b[i] === 0)) i++;
  let v = 0;
  let digits = 0;
  for (; i < end; i++) {
    const c = b[i]!;
    if (c >= 0x30 && c <= 0x37) {
      v = v * 8 + (c - 0x30);
      digits++;
    } else break;
  }
  for (; i < end; i++) {
    const c = b[i]!;
    if (c !== 0 && c !== 0x20) return null;
  }
  return digits === 0 ? 0 : v;
}

function checksumOk(b: Buffer, o: number, want: number): boolean {
  let u = 0;
  let s = 0;
  for (let i = o; i < o + BLOCK; i++) {
    const c = i >= o + 148 && i < o + 156 ? 0x20 : b[i]!;
    u += c;
    s += c > 127 ? c - 256 : c;
  }
  return u === want || s === want;
}

function printable(c: number): string {
  return c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, "0")}`;
}

const DECIMAL = /^\d{1,19}$/;
const TIME = /^-?\d{1,15}(\.\d{1,30})?$/;

/** PAX records "LEN KEY=VALUE\n"; values stay bytes until a key says what they are. */
function parsePax(body: Buffer, into: Pending, fail: (m: string) => never): void {
  let pos = 0;
  while (pos < body.length) {
    if (body[pos] === 0) {
      // NUL padding after the last record (some writers)
      for (let i = pos; i < body.length; i++) if (body[i] !== 0) fail("corrupt PAX header (data after NUL padding)");
      return;
    }
    let len = 0;
    let i = pos;
    while (i < body.length && body[i]! >= 0x30 && body[i]! <= 0x39 && i - pos < 10) {
      len = len * 10 + (body[i]! - 0x30);
      i++;
    }
    if (i === pos || body[i] !== 0x20 || len < 5 || pos + len > body.length || body[pos + len - 1] !== 0x0a) {
      fail("corrupt PAX header (bad record length)");
    }
    const rec = body.subarray(i + 1, pos + len - 1);
    const eq = rec.indexOf(0x3d);
    if (eq <= 0) fail("corrupt PAX header (record without key)");
    const key = rec.toString("latin1", 0, eq);
    const raw = rec.subarray(eq + 1);
    pos += len;
    applyPax(key, raw, into, fail);
  }
}

function paxString(raw: Buffer, key: string, fail: (m: string) => never): string {
  if (raw.includes(0)) fail(`PAX ${key} contains a NUL byte`);
  try {
    return utf8.decode(raw);
  } catch {
    return fail(`PAX ${key} is not valid UTF-8`);
  }
}

function paxInt(raw: Buffer, key: string, fail: (m: string) => never): number {
  const s = raw.toString("latin1");
  if (!DECIMAL.test(s)) fail(`PAX ${key} is not a decimal number`);
  const v = Number(s);
  if (!Number.isSafeInteger(v)) fail(`PAX ${key} is too large`);
  return v;
}

function paxTime(raw: Buffer, key: string, fail: (m: string) => never): number {
  const s = raw.toString("latin1");
  if (!TIME.test(s)) fail(`PAX ${key} is not a time`);
  return Number(s);
}

function applyPax(key: string, raw: Buffer, p: Pending, fail: (m: string) => never): void {
  // An empty value deletes the keyword: the header field applies again (POSIX pax).
  const empty = raw.length === 0;
  switch (key) {
    case "path":
      p.path = empty ? undefined : paxString(raw, key, fail);
      return;
    case "linkpath":
      p.linkpath = empty ? undefined : paxString(raw, key, fail);
      return;
    case "size":
      p.size = empty ? undefined : paxInt(raw, key, fail);
      return;
    case "uid":
      p.uid = empty ? undefined : paxInt(raw, key, fail);
      return;
    case "gid":
      p.gid = empty ? undefined : paxInt(raw, key, fail);
      return;
    case "mtime":
      p.mtime = empty ? undefined : paxTime(raw, key, fail);
      return;
    case "atime":
      p.atime = empty ? undefined : paxTime(raw, key, fail);
      return;
    case "SCHILY.devmajor":
      p.devmajor = empty ? undefined : paxInt(raw, key, fail);
      return;
    case "SCHILY.devminor":
      p.devminor = empty ? undefined : paxInt(raw, key, fail);
      return;
  }
  if (key.startsWith("SCHILY.xattr.")) {
    const name = paxString(Buffer.from(key.slice(13), "latin1"), "xattr name", fail);
    if (name === "") fail("PAX xattr without a name");
    p.xattrs ??= new Map();
    p.xattrs.set(name, Buffer.from(raw));
    return;
  }
  if (key.startsWith("LIBARCHIVE.xattr.")) {
    // libarchive: URL-encoded name, base64 value
    let name: string;
    try {
      name = decodeURIComponent(key.slice(17));
    } catch {
      fail("PAX LIBARCHIVE.xattr name is not URL-encoded");
    }
    if (name === "") fail("PAX xattr without a name");
    p.xattrs ??= new Map();
    p.xattrs.set(name, Buffer.from(raw.toString("latin1"), "base64"));
    return;
  }
  if (key.startsWith("GNU.sparse.")) fail("GNU sparse files are not supported");
  // Everything else (uname, gname, ctime, charset, comment, SCHILY.dev/ino/nlink, …) is not needed.
}
