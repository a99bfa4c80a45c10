// The one decoder of tar headers in thinimg: the layer applier (streaming, apply/tar-reader.ts) and
// the image-archive index (seeking, tar-index.ts) both turn 512-byte blocks, PAX records, GNU long
// names and GNU sparse maps into entries here. Interpretation follows Go's archive/tar, which
// builds and unpacks most images (docker, containerd, buildkit, umoci): what it refuses is refused
// (a bad checksum or number, a negative size, a zero block followed by data), where it is lenient
// so are we (GNU atime/ctime that old writers filled with garbage, decimal numbers with leading
// zeros). Every failure is a TarFormatError naming the stream offset; a feature that is valid but
// not implemented is marked `unsupported`, never called corruption.
//
// Names and link targets are "byte strings": one char per byte (latin1), so a name that is not
// UTF-8 (GNU tar's PAX hdrcharset=BINARY, raw bytes in ustar/GNU headers) stays exactly what the
// archive says. apply/bytepath.ts turns them into fs paths and into text for messages.

export type EntryType = "file" | "link" | "symlink" | "char" | "block" | "dir" | "fifo";

/** A data region of a sparse file: `length` bytes at `offset`; everything else is a hole. */
export interface SparseRegion {
  offset: number;
  length: number;
}

export interface TarEntry {
  /** Path as written in the archive (after PAX `path` / GNU long name), a byte string, not normalised. */
  name: string;
  /** Link target as written (symlink or hardlink), a byte string. */
  linkname: string;
  type: EntryType;
  /** Permission bits incl. setuid/setgid/sticky (file-type bits masked off). */
  mode: number;
  uid: number;
  gid: number;
  /** Apparent size of a regular file (holes included for a sparse file); 0 for other types. */
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
  /** Data regions of a GNU sparse file, in order (the rest are holes); null for a plain file. */
  sparse: SparseRegion[] | null;
}

/**
 * Malformed (or unsupported) archive. `entry` names the entry at fault when `inEntry`, else the last
 * good entry before the damage (null at the start). `unsupported`: valid tar, feature not implemented.
 */
export class TarFormatError extends Error {
  constructor(
    message: string,
    readonly offset: number,
    readonly entry: string | null,
    readonly inEntry = false,
    readonly unsupported = false,
  ) {
    super(message);
    this.name = "TarFormatError";
  }
}

export const BLOCK = 512;
/** Largest PAX / GNU long-name body accepted (one entry's metadata; Go's limit too). */
export const MAX_META_BYTES = 1024 * 1024;
/** Largest GNU sparse map (regions) of one file; GNU tar writes one region per data extent. */
export const MAX_SPARSE_REGIONS = 1 << 18;
/** Largest PAX 1.0 sparse map (it opens the file's data). */
export const MAX_SPARSE_MAP_BYTES = 8 * 1024 * 1024;

export const padOf = (n: number): number => (BLOCK - (n % BLOCK)) % BLOCK;

export function isZeroBlock(b: Buffer, o: number): boolean {
  if (b[o] !== 0 || b[o + 148] !== 0) return false;
  for (let i = o; i < o + BLOCK; i++) if (b[i] !== 0) return false;
  return true;
}

/**
 * What the next bytes of the stream are, after a header block:
 * - zero / eof: a zero block; the second one in a row ends the archive.
 * - meta: `size` bytes of an extended header (+ padding); hand them to meta().
 * - skip: `size` bytes (+ padding) nobody needs (a GNU volume label).
 * - entry: an entry. `ext`: old-GNU sparse extension blocks follow the header (feed sparseExt()
 *   until it returns false). `map1x0`: a PAX 1.0 sparse map opens the data (see parseSparseMap1x0).
 *   `stored` is the body size in the archive (0 for header-only types).
 */
export type Step =
  | { kind: "zero" }
  | { kind: "eof" }
  | { kind: "meta"; size: number }
  | { kind: "skip"; size: number }
  | { kind: "entry"; entry: TarEntry; stored: number; ext: boolean; map1x0: boolean };

type MetaKind = "pax" | "gpax" | "longname" | "longlink";

/** What PAX / GNU extended headers set for the next entry. */
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
  // GNU sparse, PAX encodings (0.0: offset/numbytes records, 0.1: map, 1.0: map in the data)
  sparseMajor?: string;
  sparseMinor?: string;
  sparseName?: string;
  sparseSize?: string;
  sparseRealSize?: string;
  sparseNumBlocks?: string;
  sparseMap?: string;
}

// Offsets in a header block.
const GNU_SPARSE = 386; // 4 × (offset[12], numbytes[12])
const GNU_IS_EXTENDED = 482;
const GNU_REAL_SIZE = 483;
const EXT_ENTRIES = 21; // per extension block, isextended at 504

export class HeaderDecoder {
  private pending: Pending = {};
  private metaKind: MetaKind = "pax";
  private zeros = 0;
  /** Name of the last entry decoded (byte string), for messages. */
  lastName: string | null = null;

  fail(msg: string, at: number, inEntry = false, unsupported = false): never {
    throw new TarFormatError(msg, at, this.lastName, inEntry, unsupported);
  }

  hasPending(): boolean {
    const p = this.pending;
    for (const k in p) if ((p as Record<string, unknown>)[k] !== undefined) return true;
    return false;
  }

  /** The stream ended at a block boundary: fine unless an extended header is still waiting. */
  end(at: number): void {
    if (this.hasPending()) this.fail(`archive ends after an extended header, before its entry (offset ${at})`, at);
  }

  /** Decode the header block b[o..o+512) found at stream offset `at`. */
  block(b: Buffer, o: number, at: number): Step {
    if (isZeroBlock(b, o)) {
      if (++this.zeros === 2) {
        this.end(at);
        return { kind: "eof" };
      }
      return { kind: "zero" };
    }
    this.checkHeader(b, o, at);
    const fmt = formatOf(b, o);
    // Go parses every numeric field of every header and refuses the archive if one is malformed.
    const size = this.num(b, o + 124, 12, "size", at);
    const mode = this.num(b, o + 100, 8, "mode", at);
    const uid = this.num(b, o + 108, 8, "uid", at);
    const gid = this.num(b, o + 116, 8, "gid", at);
    const mtime = this.num(b, o + 136, 12, "mtime", at);
    const devmajor = fmt === "v7" ? 0 : this.num(b, o + 329, 8, "devmajor", at);
    const devminor = fmt === "v7" ? 0 : this.num(b, o + 337, 8, "devminor", at);
    if (size < 0) this.fail(`corrupt tar header at offset ${at} (negative size)`, at);
    if (!Number.isSafeInteger(size)) this.fail(`corrupt tar header at offset ${at} (size too large)`, at);

    const flag = b[o + 156]!;
    const meta = META_TYPES[String.fromCharCode(flag)];
    if (meta === "skip") return { kind: "skip", size };
    if (meta !== undefined) return this.startMeta(meta, size, at);

    const p = this.pending;
    const { prefix, atime } = this.prefixAndAtime(b, o, at, fmt);
    let name = p.longName ?? p.path ?? (prefix === "" ? cstr(b, o, 100) : `${prefix}/${cstr(b, o, 100)}`);
    const linkname = p.longLink ?? p.linkpath ?? cstr(b, o + 157, 100);
    this.lastName = name;
    const type = this.typeOf(flag, name, fmt, at);
    const oldSparse = flag === 0x53;

    // Header-only types carry no data whatever their size field says (Go); a file's data and a dump
    // dir's listing (skipped) are the body.
    const stored = type === "file" || flag === 0x44 ? (p.size ?? size) : 0;
    let apparent = type === "file" ? stored : 0;
    let sparse: SparseRegion[] | null = null;
    let map1x0 = false;
    if (oldSparse) {
      apparent = this.num(b, o + GNU_REAL_SIZE, 12, "sparse real size", at);
      sparse = [];
      this.oldSparseEntries(sparse, b, o + GNU_SPARSE, 4, at);
    } else if (type === "file") {
      const ps = this.paxSparse(at);
      if (ps) {
        name = ps.name ?? name;
        this.lastName = name;
        apparent = ps.size ?? apparent;
        sparse = ps.map;
        map1x0 = ps.map1x0;
      }
    }
    if (!Number.isSafeInteger(apparent) || apparent < 0) this.fail(`corrupt tar header at offset ${at} (bad sparse size)`, at, true);
    const device = type === "char" || type === "block";
    const entry: TarEntry = {
      name,
      linkname: type === "link" || type === "symlink" ? linkname : "",
      type,
      mode: mode & 0o7777,
      uid: p.uid ?? uid,
      gid: p.gid ?? gid,
      size: apparent,
      mtime: p.mtime ?? mtime,
      atime: p.atime ?? atime,
      devmajor: device ? (p.devmajor ?? devmajor) : 0,
      devminor: device ? (p.devminor ?? devminor) : 0,
      xattrs: p.xattrs ?? null,
      offset: at,
      sparse,
    };
    this.pending = {};
    const ext = oldSparse && b[o + GNU_IS_EXTENDED] !== 0;
    if (sparse && !ext && !map1x0) this.checkSparse(entry, stored, at);
    return { kind: "entry", entry, stored, ext, map1x0 };
  }

  /** A non-zero header block: refused after a lone zero block or with a bad checksum. */
  private checkHeader(b: Buffer, o: number, at: number): void {
    if (this.zeros > 0) this.fail(`corrupt archive: a lone zero block inside the archive at offset ${at - BLOCK}`, at - BLOCK);
    const cksum = parseOctal(b, o + 148, 8);
    if (cksum === null || !checksumOk(b, o, cksum)) {
      this.fail(at === 0 ? "not a tar archive (bad header checksum at offset 0)" : `corrupt tar header at offset ${at} (checksum mismatch)`, at);
    }
  }

  /** The ustar/star prefix, and atime where the format has one (GNU: leniently, as Go). */
  private prefixAndAtime(b: Buffer, o: number, at: number, fmt: Format): { prefix: string; atime: number | null } {
    if (fmt === "ustar") return { prefix: cstr(b, o + 345, 155), atime: null };
    if (fmt === "star") {
      const atime = this.num(b, o + 476, 12, "atime", at) || null;
      this.num(b, o + 488, 12, "ctime", at);
      return { prefix: cstr(b, o + 345, 131), atime };
    }
    if (fmt === "v7") return { prefix: "", atime: null };
    // Old writers (Go before 1.8) put a ustar prefix here: unparsable atime/ctime are ignored,
    // and an ASCII prefix in their place is used as one, as Go does.
    const a = b[o + 345] === 0 ? 0 : parseNumeric(b, o + 345, 12);
    const c = b[o + 357] === 0 ? 0 : parseNumeric(b, o + 357, 12);
    if (a !== null && c !== null) return { prefix: "", atime: a === 0 ? null : a };
    const pf = cstr(b, o + 345, 155);
    return { prefix: /[^\x00-\x7f]/.test(pf) ? "" : pf, atime: null };
  }

  private typeOf(flag: number, name: string, fmt: Format, at: number): EntryType {
    const t = ENTRY_TYPES[String.fromCharCode(flag)];
    if (t !== undefined) return t;
    switch (flag) {
      case 0: // old-style regular file; a trailing slash meant a directory (v7)
        return name.endsWith("/") ? "dir" : "file";
      case 0x53: // 'S' old GNU sparse file
        if (fmt !== "gnu") this.fail(`sparse entry at offset ${at} is not in GNU format (star sparse files are not supported)`, at, true, true);
        return "file";
      case 0x4d: // 'M' GNU multi-volume continuation
        return this.fail(`multi-volume archives are not supported (continuation entry at offset ${at})`, at, true, true);
      default:
        return this.fail(`unsupported entry type '${printable(flag)}' at offset ${at}`, at, true, true);
    }
  }

  /** An old-GNU sparse extension block (21 regions); true when another one follows. */
  sparseExt(e: TarEntry, stored: number, b: Buffer, o: number, at: number): boolean {
    if (e.sparse!.length > MAX_SPARSE_REGIONS) this.fail(`sparse map of more than ${MAX_SPARSE_REGIONS} regions at offset ${at}`, at, true);
    this.oldSparseEntries(e.sparse!, b, o, EXT_ENTRIES, at);
    const more = b[o + EXT_ENTRIES * 24] !== 0;
    if (!more) this.checkSparse(e, stored, at);
    return more;
  }

  /**
   * A PAX 1.0 sparse map from the first blocks of the data: decimal numbers, one a line (count,
   * then offset and length per region), padded to a block. `buf` holds the blocks read so far and
   * `newlines` the '\n' bytes in them; the map is parsed only once `need` of them are there (1 for
   * the count, then 1 + 2 × count), so a big map costs two scans, not one per block. Returns the
   * bytes the map takes (whole blocks) once complete, else how many newlines it needs.
   */
  sparseMap1x0(e: TarEntry, stored: number, buf: Buffer, newlines: number, need: number, at: number): { used: number } | { need: number } {
    const incomplete = (want: number): { need: number } => {
      if (buf.length > MAX_SPARSE_MAP_BYTES) this.fail(`GNU sparse map at offset ${at} exceeds ${MAX_SPARSE_MAP_BYTES} bytes`, at, true);
      if (buf.length >= stored) this.fail(`GNU sparse map runs past the entry's data at offset ${at}`, at, true);
      return { need: want };
    };
    if (newlines < need) return incomplete(need);
    const lines: number[] = [];
    let start = 0;
    let want = 1;
    for (let i = 0; i < buf.length && lines.length < want; i++) {
      if (buf[i] !== 0x0a) continue;
      const v = parseDecimal(buf.toString("latin1", start, i));
      if (v === null || v < 0) this.fail(`corrupt GNU sparse map at offset ${at}`, at, true);
      lines.push(v);
      start = i + 1;
      if (lines.length === 1) {
        if (v > MAX_SPARSE_REGIONS) this.fail(`sparse map of more than ${MAX_SPARSE_REGIONS} regions at offset ${at}`, at, true);
        want = 1 + 2 * v;
      }
    }
    if (lines.length < want) return incomplete(want);
    const used = start + padOf(start);
    const map: SparseRegion[] = [];
    for (let i = 1; i < lines.length; i += 2) map.push({ offset: lines[i]!, length: lines[i + 1]! });
    e.sparse = map;
    this.checkSparse(e, stored - used, at);
    return { used };
  }

  /** Go's validateSparseEntries, plus: the regions add up to exactly the data stored. */
  private checkSparse(e: TarEntry, stored: number, at: number): void {
    let end = 0;
    let total = 0;
    for (const r of e.sparse!) {
      if (r.offset < end || r.offset + r.length > e.size || !Number.isSafeInteger(r.offset + r.length)) {
        this.fail(`corrupt GNU sparse map at offset ${at} (regions overlap, are out of order or past the file size)`, at, true);
      }
      end = r.offset + r.length;
      total += r.length;
    }
    if (total !== stored) {
      this.fail(`corrupt GNU sparse entry at offset ${at} (its map covers ${total} bytes, the archive stores ${stored})`, at, true);
    }
  }

  private oldSparseEntries(into: SparseRegion[], b: Buffer, o: number, n: number, at: number): void {
    for (let i = 0; i < n; i++) {
      const x = o + 24 * i;
      if (b[x] === 0) break; // as GNU and BSD tar
      into.push({ offset: this.num(b, x, 12, "sparse offset", at), length: this.num(b, x + 12, 12, "sparse length", at) });
    }
  }

  /** GNU sparse in PAX records (0.0, 0.1, 1.0), as Go's readGNUSparsePAXHeaders; null: not sparse. */
  private paxSparse(at: number): { name?: string; size?: number; map: SparseRegion[] | null; map1x0: boolean } | null {
    const p = this.pending;
    const major = p.sparseMajor;
    const minor = p.sparseMinor;
    let is1x0: boolean;
    if (major === "0" && (minor === "0" || minor === "1")) is1x0 = false;
    else if (major === "1" && minor === "0") is1x0 = true;
    else if (major !== undefined || minor !== undefined) {
      this.fail(`GNU sparse format ${major ?? "?"}.${minor ?? "?"} is not supported (entry at offset ${at})`, at, true, true);
    } else if (p.sparseMap !== undefined) is1x0 = false;
    else return null;

    const sizeStr = p.sparseSize ?? p.sparseRealSize;
    const size = sizeStr === undefined ? undefined : parseDecimal(sizeStr);
    if (size === null) this.fail(`corrupt GNU sparse size at offset ${at}`, at, true);
    const out = { ...(p.sparseName !== undefined ? { name: p.sparseName } : {}), ...(size !== undefined ? { size } : {}) };
    if (is1x0) return { ...out, map: null, map1x0: true };

    const n = parseDecimal(p.sparseNumBlocks ?? "");
    const parts = p.sparseMap === undefined || p.sparseMap === "" ? [] : p.sparseMap.split(",");
    if (n === null || n < 0 || parts.length !== 2 * n) this.fail(`corrupt GNU sparse map at offset ${at}`, at, true);
    const map: SparseRegion[] = [];
    for (let i = 0; i < parts.length; i += 2) {
      const offset = parseDecimal(parts[i]!);
      const length = parseDecimal(parts[i + 1]!);
      if (offset === null || length === null || offset < 0 || length < 0) this.fail(`corrupt GNU sparse map at offset ${at}`, at, true);
      map.push({ offset, length });
    }
    return { ...out, map, map1x0: false };
  }

  private startMeta(kind: MetaKind, size: number, at: number): Step {
    if (size > MAX_META_BYTES) {
      this.fail(`extended header of ${size} bytes at offset ${at} exceeds the ${MAX_META_BYTES}-byte limit`, at);
    }
    this.metaKind = kind;
    return { kind: "meta", size };
  }

  /** The body of the extended header announced by the last meta step; `at` is its stream offset. */
  meta(body: Buffer, at: number): void {
    switch (this.metaKind) {
      case "longname":
        this.pending.longName = cstr(body, 0, body.length);
        if (this.pending.longName === "") this.fail(`empty GNU long name at offset ${at}`, at);
        break;
      case "longlink":
        this.pending.longLink = cstr(body, 0, body.length);
        break;
      case "pax":
        parsePax(body, this.pending, (m) => this.fail(`${m} at offset ${at}`, at));
        break;
      case "gpax":
        // Global headers are validated and otherwise ignored, as containerd does.
        parsePax(body, {}, (m) => this.fail(`${m} at offset ${at}`, at));
        break;
    }
  }

  private num(b: Buffer, off: number, len: number, field: string, at: number): number {
    const v = parseNumeric(b, off, len);
    if (v === null) this.fail(`corrupt tar header at offset ${at} (bad ${field})`, at);
    return v;
  }
}

type Format = "ustar" | "star" | "gnu" | "v7";

/** Go's getFormat, once the checksum is good: star has a "tar\0" trailer, GNU its own magic. */
function formatOf(b: Buffer, o: number): Format {
  const magic = b.toString("latin1", o + 257, o + 263);
  if (magic === "ustar\0") return b.toString("latin1", o + 508, o + 512) === "tar\0" ? "star" : "ustar";
  if (magic === "ustar " && b[o + 263] === 0x20 && b[o + 264] === 0) return "gnu";
  return "v7";
}

/** Type flags of extended headers (their body is metadata for the next entry) and skipped bodies. */
const META_TYPES: Record<string, MetaKind | "skip"> = {
  x: "pax", // PAX extended header (next entry)
  g: "gpax", // PAX global header
  L: "longname", // GNU long name
  K: "longlink", // GNU long link name
  V: "skip", // GNU volume label: not a file
};

/** Type flags of entries, except those that depend on more than the flag (see typeOf). */
const ENTRY_TYPES: Record<string, EntryType> = {
  "0": "file",
  "7": "file", // contiguous file
  "1": "link",
  "2": "symlink",
  "3": "char",
  "4": "block",
  "5": "dir",
  "6": "fifo",
  D: "dir", // GNU dump dir: a directory whose body (a listing) is skipped
};

/** A NUL-terminated field as a byte string. */
function cstr(b: Buffer, start: number, len: number): string {
  const z = b.indexOf(0, start);
  return b.toString("latin1", start, z < 0 || z > start + len ? start + len : z);
}

/**
 * Go's parseNumeric: base-256 when the top bit is set (two's complement; 0x40 of the first byte is
 * the sign), else octal with leading/trailing spaces and NULs. null when malformed or beyond int64;
 * values beyond 2^53 come back inexact (callers that need exactness check isSafeInteger).
 */
export function parseNumeric(b: Buffer, off: number, len: number): number | null {
  const first = b[off]!;
  if (first & 0x80) {
    const inv = first & 0x40 ? 0xff : 0;
    let x = 0n;
    for (let i = 0; i < len; i++) {
      let c = b[off + i]! ^ inv;
      if (i === 0) c &= 0x7f;
      if (x >> 56n > 0n) return null;
      x = (x << 8n) | BigInt(c);
    }
    if (x >> 63n > 0n) return null;
    return inv ? -Number(x) - 1 : Number(x);
  }
  return parseOctal(b, off, len);
}

/** Octal digits between optional spaces/NULs on either side; null when anything else is there. */
export function parseOctal(b: Buffer, off: number, len: number): number | null {
  let i = off;
  let end = off + len;
  while (i < end && (b[i] === 0x20 || b[i] === 0)) i++;
  while (end > i && (b[end - 1] === 0x20 || b[end - 1] === 0)) end--;
  let v = 0;
  for (; i < end; i++) {
    const c = b[i]!;
    if (c < 0x30 || c > 0x37) return null;
    v = v * 8 + (c - 0x30);
  }
  return v;
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

/** strconv.ParseInt(s, 10, 64): optional sign, any number of digits (leading zeros too). */
const DECIMAL = /^[+-]?\d+$/;
function parseDecimal(s: string): number | null {
  if (!DECIMAL.test(s)) return null;
  const v = Number(s);
  return Number.isSafeInteger(v) ? v : null;
}

/** PAX records "LEN KEY=VALUE\n"; values stay bytes until a key says what they are. */
function parsePax(body: Buffer, into: Pending, fail: (m: string) => never): void {
  const sparse: string[] = [];
  let pos = 0;
  while (pos < body.length) {
    if (body[pos] === 0) {
      // NUL padding after the last record (some writers)
      for (let i = pos; i < body.length; i++) if (body[i] !== 0) fail("corrupt PAX header (data after NUL padding)");
      break;
    }
    let len = 0;
    let i = pos;
    while (i < body.length && body[i]! >= 0x30 && body[i]! <= 0x39 && i - pos < 10) {
      len = len * 10 + (body[i]! - 0x30);
      i++;
    }
    if (i === pos || body[i] !== 0x20 || len < 5 || pos + len > body.length || i + 1 >= pos + len || body[pos + len - 1] !== 0x0a) {
      fail("corrupt PAX header (bad record length)");
    }
    const rec = body.subarray(i + 1, pos + len - 1);
    const eq = rec.indexOf(0x3d);
    if (eq <= 0) fail("corrupt PAX header (record without key)");
    const key = rec.toString("latin1", 0, eq);
    const raw = rec.subarray(eq + 1);
    pos += len;
    if (key.includes("\0")) fail("corrupt PAX header (NUL in a key)");
    if (key === "GNU.sparse.offset" || key === "GNU.sparse.numbytes") {
      // PAX sparse 0.0: repeated records, offset then numbytes (Go turns them into a 0.1 map)
      const s = raw.toString("latin1");
      if ((sparse.length % 2 === 0) !== (key === "GNU.sparse.offset") || s.includes(",")) fail("corrupt PAX header (GNU sparse records out of order)");
      if (sparse.length >= 2 * MAX_SPARSE_REGIONS) fail("corrupt PAX header (too many GNU sparse records)");
      sparse.push(s);
      continue;
    }
    applyPax(key, raw, into, fail);
  }
  if (sparse.length > 0) into.sparseMap = sparse.join(",");
}

function paxName(raw: Buffer, key: string, fail: (m: string) => never): string {
  if (raw.includes(0)) fail(`PAX ${key} contains a NUL byte`);
  return raw.toString("latin1"); // bytes kept as they are, whatever hdrcharset says
}

function paxInt(raw: Buffer, key: string, fail: (m: string) => never): number {
  const v = parseDecimal(raw.toString("latin1"));
  if (v === null) fail(`PAX ${key} is not a decimal number in range`);
  return v;
}

/** Go's parsePAXTime: seconds, optionally "." and digits (truncated to ns). */
const TIME = /^[+-]?\d+(\.\d*)?$/;
function paxTime(raw: Buffer, key: string, fail: (m: string) => never): number {
  const s = raw.toString("latin1");
  if (!TIME.test(s)) fail(`PAX ${key} is not a time`);
  const v = Number(s);
  if (!Number.isFinite(v) || Math.abs(v) > 2 ** 53) fail(`PAX ${key} is out of range`);
  return v;
}

const SPARSE_KEYS: Record<string, keyof Pending> = {
  "GNU.sparse.major": "sparseMajor",
  "GNU.sparse.minor": "sparseMinor",
  "GNU.sparse.name": "sparseName",
  "GNU.sparse.size": "sparseSize",
  "GNU.sparse.realsize": "sparseRealSize",
  "GNU.sparse.numblocks": "sparseNumBlocks",
  "GNU.sparse.map": "sparseMap",
};

function applyPax(key: string, raw: Buffer, p: Pending, fail: (m: string) => never): void {
  // An empty value deletes the keyword: the header field applies again (POSIX pax).
  const empty = raw.length === 0;
  switch (key) {
    case "path":
      p.path = empty ? undefined : paxName(raw, key, fail);
      return;
    case "linkpath":
      p.linkpath = empty ? undefined : paxName(raw, key, fail);
      return;
    case "size":
      p.size = empty ? undefined : paxInt(raw, key, fail);
      if (p.size !== undefined && p.size < 0) fail("PAX size is negative");
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
    case "ctime":
      if (!empty) paxTime(raw, key, fail); // validated, as Go does; not applied
      return;
    case "uname":
    case "gname":
      paxName(raw, key, fail);
      return;
    case "SCHILY.devmajor":
      p.devmajor = empty ? undefined : paxInt(raw, key, fail);
      return;
    case "SCHILY.devminor":
      p.devminor = empty ? undefined : paxInt(raw, key, fail);
      return;
  }
  const sk = SPARSE_KEYS[key];
  if (sk !== undefined) {
    const v = key === "GNU.sparse.name" ? paxName(raw, key, fail) : raw.toString("latin1");
    (p as Record<string, string | undefined>)[sk] = empty ? undefined : v;
    return;
  }
  if (key.startsWith("SCHILY.xattr.")) {
    const name = Buffer.from(key.slice(13), "latin1").toString("utf8");
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
  // Everything else (hdrcharset, charset, comment, SCHILY.dev/ino/nlink, …) is not needed.
}
