// Hand-written tar archives for tests: every header field under the test's control, including the
// ones a well-behaved writer would never produce (climbing names, bad checksums, lying sizes,
// binary PAX values). No tar library is involved, so the reader under test cannot agree with its
// own writer's mistakes.

export type TypeFlag = "0" | "\0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "x" | "g" | "L" | "K" | "S" | "D" | "V" | string;

export interface HeaderSpec {
  /** Goes into the 100-byte name field (truncated there; use prefix/PAX/GNU for longer). */
  name: string | Uint8Array;
  mode?: number;
  uid?: number;
  gid?: number;
  /** Size written in the header; defaults to the data length. */
  size?: number;
  mtime?: number;
  type?: TypeFlag;
  linkname?: string | Uint8Array;
  /** "ustar" (POSIX, default), "gnu" ("ustar  \0") or "v7" (no magic). */
  format?: "ustar" | "gnu" | "v7";
  uname?: string;
  gname?: string;
  devmajor?: number;
  devminor?: number;
  /** ustar prefix field (155 bytes). */
  prefix?: string;
  /** Write this checksum instead of the right one. */
  checksum?: number;
  /** Encode numeric fields in base-256 (GNU) even when octal fits. */
  base256?: boolean;
}

const enc = new TextEncoder();
const bytes = (s: string | Uint8Array): Uint8Array => (typeof s === "string" ? enc.encode(s) : s);

function putBytes(b: Buffer, off: number, len: number, v: string | Uint8Array): void {
  const src = bytes(v);
  b.set(src.subarray(0, len), off);
}

function putNum(b: Buffer, off: number, len: number, v: number, base256 = false): void {
  const oct = Math.trunc(v).toString(8);
  if (!base256 && v >= 0 && oct.length <= len - 1) {
    putBytes(b, off, len, `${oct.padStart(len - 1, "0")}\0`);
    return;
  }
  // base-256: 0x80 marker (0xff for negative, two's complement)
  let n = BigInt(Math.trunc(v));
  if (n < 0n) n = (1n << BigInt(8 * len)) + n;
  for (let i = len - 1; i >= 1; i--) {
    b[off + i] = Number(n & 0xffn);
    n >>= 8n;
  }
  b[off] = v < 0 ? 0xff : 0x80;
}

export function header(s: HeaderSpec, dataLen = 0): Buffer {
  const b = Buffer.alloc(512);
  putBytes(b, 0, 100, s.name);
  putNum(b, 100, 8, s.mode ?? 0o644, s.base256);
  putNum(b, 108, 8, s.uid ?? 0, s.base256);
  putNum(b, 116, 8, s.gid ?? 0, s.base256);
  putNum(b, 124, 12, s.size ?? dataLen, s.base256);
  putNum(b, 136, 12, s.mtime ?? 1_700_000_000, s.base256);
  const type = s.type ?? "0";
  b[156] = type === "\0" ? 0 : type.charCodeAt(0);
  if (s.linkname !== undefined) putBytes(b, 157, 100, s.linkname);
  const format = s.format ?? "ustar";
  if (format === "ustar") {
    putBytes(b, 257, 8, "ustar\u000000");
  } else if (format === "gnu") {
    putBytes(b, 257, 8, "ustar  \0");
  }
  if (format !== "v7") {
    putBytes(b, 265, 32, s.uname ?? "");
    putBytes(b, 297, 32, s.gname ?? "");
    putNum(b, 329, 8, s.devmajor ?? 0);
    putNum(b, 337, 8, s.devminor ?? 0);
    if (s.prefix !== undefined) putBytes(b, 345, 155, s.prefix);
  }
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += b[i]!;
  const ck = s.checksum ?? sum;
  putBytes(b, 148, 8, `${ck.toString(8).padStart(6, "0")}\0 `);
  return b;
}

const pad = (n: number): Buffer => Buffer.alloc((512 - (n % 512)) % 512);

/** Header + data + block padding. */
export function entry(s: HeaderSpec & { data?: string | Uint8Array }): Buffer {
  const data = s.data === undefined ? new Uint8Array(0) : bytes(s.data);
  return Buffer.concat([header(s, data.length), data, pad(data.length)]);
}

/** One PAX record "LEN KEY=VALUE\n", LEN counting itself. */
export function paxRecord(key: string, value: string | Uint8Array): Buffer {
  const kv = Buffer.concat([Buffer.from(` ${key}=`), bytes(value), Buffer.from("\n")]);
  let len = kv.length + 1;
  while (String(len).length + kv.length !== len) len = String(len).length + kv.length;
  return Buffer.concat([Buffer.from(String(len)), kv]);
}

/** A PAX extended header ('x', or 'g' when global) carrying the given records. */
export function pax(records: Record<string, string | Uint8Array> | [string, string | Uint8Array][], global = false): Buffer {
  const list = Array.isArray(records) ? records : Object.entries(records);
  const body = Buffer.concat(list.map(([k, v]) => paxRecord(k, v)));
  return entry({ name: global ? "pax_global_header" : "PaxHeaders/x", type: global ? "g" : "x", data: body });
}

/** GNU long name ('L') or long link ('K') pseudo-entry for the next header. */
export function gnuLong(kind: "L" | "K", value: string): Buffer {
  return entry({ name: "././@LongLink", type: kind, format: "gnu", data: Buffer.concat([Buffer.from(value), Buffer.alloc(1)]) });
}

export interface Meta {
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: number;
}

export const file = (name: string, data: string | Uint8Array = "", m: Meta = {}): Buffer => entry({ name, data, type: "0", ...m });
export const dir = (name: string, m: Meta = {}): Buffer => entry({ name, type: "5", mode: 0o755, ...m });
export const symlink = (name: string, target: string, m: Meta = {}): Buffer => entry({ name, type: "2", linkname: target, mode: 0o777, ...m });
export const hardlink = (name: string, target: string, m: Meta = {}): Buffer => entry({ name, type: "1", linkname: target, ...m });
export const fifo = (name: string, m: Meta = {}): Buffer => entry({ name, type: "6", ...m });
export const chardev = (name: string, major: number, minor: number, m: Meta = {}): Buffer => entry({ name, type: "3", devmajor: major, devminor: minor, ...m });
export const whiteout = (dirPath: string, name: string): Buffer => file(`${dirPath ? `${dirPath}/` : ""}.wh.${name}`, "", { mode: 0o600 });
export const opaque = (dirPath: string): Buffer => file(`${dirPath ? `${dirPath}/` : ""}.wh..wh..opq`, "", { mode: 0o600 });

/** Entries, then the two zero blocks that end an archive. */
export function tar(...parts: Buffer[]): Buffer {
  return Buffer.concat([...parts, Buffer.alloc(1024)]);
}

/** A stream over buf in chunks of `chunk` bytes (tests chunk boundaries). */
export function streamOf(buf: Uint8Array, chunk = 65536): ReadableStream<Uint8Array> {
  let off = 0;
  return new ReadableStream<Uint8Array>({
    pull(c) {
      if (off >= buf.length) {
        c.close();
        return;
      }
      const end = Math.min(buf.length, off + chunk);
      c.enqueue(buf.slice(off, end));
      off = end;
    },
  });
}

/** Data regions of a sparse file: `data` at `offset`; the rest of `size` bytes are holes. */
export type Regions = [offset: number, data: string | Uint8Array][];

function numField(v: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  putNum(b, 0, len, v);
  return b;
}

function withChecksum(b: Buffer): Buffer {
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += b[i]!;
  putBytes(b, 148, 8, `${sum.toString(8).padStart(6, "0")}\0 `);
  return b;
}

/**
 * An old-GNU sparse entry (type 'S'): up to 4 regions in the header, the rest in extension blocks
 * of 21; `size` is the apparent size. `lie` overrides the header's stored size.
 */
export function gnuSparse(name: string, size: number, regions: Regions, lie?: { stored?: number }): Buffer {
  const data = Buffer.concat(regions.map(([, d]) => bytes(d)));
  const h = header({ name, type: "S", format: "gnu", size: lie?.stored ?? data.length }, data.length);
  const put = (b: Buffer, off: number, [o, d]: Regions[number]) => {
    numField(o, 12).copy(b, off);
    numField(bytes(d).length, 12).copy(b, off + 12);
  };
  regions.slice(0, 4).forEach((r, i) => {
    put(h, 386 + 24 * i, r);
  });
  numField(size, 12).copy(h, 483);
  const ext: Buffer[] = [];
  for (let i = 4; i < regions.length; i += 21) {
    const b = Buffer.alloc(512);
    regions.slice(i, i + 21).forEach((r, j) => {
      put(b, 24 * j, r);
    });
    ext.push(b);
  }
  ext.forEach((b, i) => {
    b[504] = i < ext.length - 1 ? 1 : 0;
  });
  h[482] = ext.length > 0 ? 1 : 0;
  return Buffer.concat([withChecksum(h), ...ext, data, pad(data.length)]);
}

/** A GNU sparse file in PAX form: "0.0" (offset/numbytes records), "0.1" (map record) or "1.0" (map in the data). */
export function paxSparse(version: "0.0" | "0.1" | "1.0", name: string, size: number, regions: Regions): Buffer {
  const data = Buffer.concat(regions.map(([, d]) => bytes(d)));
  const recs: [string, string][] = [];
  if (version === "1.0") {
    recs.push(["GNU.sparse.major", "1"], ["GNU.sparse.minor", "0"], ["GNU.sparse.name", name], ["GNU.sparse.realsize", String(size)]);
    const map = `${[regions.length, ...regions.flatMap(([o, d]) => [o, bytes(d).length])].join("\n")}\n`;
    const body = Buffer.concat([Buffer.from(map), pad(map.length), data]);
    return Buffer.concat([pax(recs), entry({ name: "GNUSparseFile.0/x", data: body })]);
  }
  recs.push(["GNU.sparse.size", String(size)], ["GNU.sparse.numblocks", String(regions.length)], ["GNU.sparse.name", name]);
  if (version === "0.0") for (const [o, d] of regions) recs.push(["GNU.sparse.offset", String(o)], ["GNU.sparse.numbytes", String(bytes(d).length)]);
  else recs.push(["GNU.sparse.map", regions.flatMap(([o, d]) => [o, bytes(d).length]).join(",")]);
  return Buffer.concat([pax(recs), entry({ name: "GNUSparseFile.0/x", data })]);
}
