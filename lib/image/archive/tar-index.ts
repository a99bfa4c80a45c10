// Index an UNCOMPRESSED tar file by member offsets without reading member bodies: read a 512-byte
// header, decode it with node-tar's Header (checksum, base-256 sizes) and Pax, then seek past the
// body. node-tar's streaming Parser would read every byte and does not report offsets; this reads
// ~1 KiB per member, so indexing a multi-GB docker-archive costs milliseconds. Members are then
// streamed by (offset, size) straight from the file — the archive is never held in memory.
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { Header } from "tar/header";
import { Pax } from "tar/pax";
import { ThinimgError } from "../../errors.ts";

export type MemberType = "file" | "dir" | "symlink" | "link" | "other";

export interface TarMember {
  /** Normalised name: no leading "./" or "/", no trailing "/". */
  name: string;
  type: MemberType;
  /** Byte offset of the body in the file. */
  offset: number;
  size: number;
  linkname: string | null;
}

export interface TarIndexOptions {
  /** For messages. */
  what: string;
  /**
   * Index at most this many members by name; past it only top-level names are kept (an image
   * archive has a few members per layer; a big rootfs tarball needs no index, only its top level).
   */
  maxMembers?: number;
}

export interface TarIndex {
  members: Map<string, TarMember>;
  /** First path component of every member. */
  topLevel: Set<string>;
  /** False when members past maxMembers were not indexed. */
  complete: boolean;
}

const META_MAX = 1024 * 1024;
const ZERO_BLOCK = Buffer.alloc(512);

/** Octal number field (NUL/space terminated); null when not plain octal (e.g. base-256). */
function octal(b: Buffer, off: number, len: number): number | null {
  let n = 0;
  let seen = false;
  for (let i = off; i < off + len; i++) {
    const c = b[i]!;
    if (c === 0 || c === 0x20) {
      if (seen) break;
      continue;
    }
    if (c < 0x30 || c > 0x37) return null;
    n = n * 8 + (c - 0x30);
    seen = true;
  }
  return seen ? n : 0;
}

/**
 * Past the indexed members only the size, the type and the first path component matter, and
 * node-tar's Header (which decodes every field, dates included: ~19 µs a header here) would cost
 * seconds on a big rootfs tarball. This reads just those three, with the checksum checked; anything
 * unusual (base-256 numbers) falls back to Header.
 */
function skim(b: Buffer): { size: number; type: string; path: string; cksumValid: boolean } | null {
  if (b[124]! & 0x80) return null;
  let sum = 8 * 0x20;
  for (let i = 0; i < 148; i++) sum += b[i]!;
  for (let i = 156; i < 512; i++) sum += b[i]!;
  const size = octal(b, 124, 12);
  if (size === null) return null;
  const end = (from: number, len: number) => {
    const z = b.indexOf(0, from);
    return z < 0 || z > from + len ? from + len : z;
  };
  let path = b.toString("utf8", 0, end(0, 100));
  if (b.toString("latin1", 257, 263) === "ustar\0" && b[345] !== 0) {
    path = `${b.toString("utf8", 345, end(345, b[475] !== 0 ? 155 : 130))}/${path}`;
  }
  const t = b[156]!;
  return { size, type: t === 0 ? "0" : String.fromCharCode(t), path, cksumValid: sum === octal(b, 148, 8) };
}

const CODE_NAMES: Record<string, string> = {
  x: "ExtendedHeader",
  X: "OldExtendedHeader",
  g: "GlobalExtendedHeader",
  L: "NextFileHasLongPath",
  N: "OldGnuLongPath",
  K: "NextFileHasLongLinkpath",
};

function typeOf(t: string): MemberType {
  switch (t) {
    case "File":
    case "OldFile":
    case "ContiguousFile":
      return "file";
    case "Directory":
    case "GNUDumpDir":
      return "dir";
    case "SymbolicLink":
      return "symlink";
    case "Link":
      return "link";
    default:
      return "other";
  }
}

/** "./a//b/" → "a/b"; keeps ".." segments (callers decide what to do with them). */
export function normalizeMemberName(name: string): string {
  return name
    .split("/")
    .filter((s) => s !== "" && s !== ".")
    .join("/");
}

function corrupt(what: string, detail: string): ThinimgError {
  return new ThinimgError("input", `${what}: not a valid tar archive (${detail})`, {
    hint: "the file is damaged, truncated or not an image archive",
  });
}

export function indexTarFile(path: string, o: TarIndexOptions): TarIndex {
  const fd = openSync(path, "r");
  try {
    return indexFd(fd, o);
  } finally {
    closeSync(fd);
  }
}

function indexFd(fd: number, o: TarIndexOptions): TarIndex {
  const fileSize = fstatSync(fd).size;
  const maxMembers = o.maxMembers ?? 4096;
  const members = new Map<string, TarMember>();
  const topLevel = new Set<string>();
  // Headers are read through a 64 KiB window: small members (most of a rootfs) cost no extra syscall.
  const win = Buffer.alloc(64 * 1024);
  let winStart = -1;
  let winLen = 0;
  const headerAt = (at: number): Buffer => {
    if (winStart < 0 || at < winStart || at + 512 > winStart + winLen) {
      winLen = readSync(fd, win, 0, Math.min(win.length, fileSize - at), at);
      winStart = at;
      if (winLen < 512) throw corrupt(o.what, `unexpected end of file at offset ${at + winLen}`);
    }
    return win.subarray(at - winStart, at - winStart + 512);
  };
  let pos = 0;
  let ex: Record<string, unknown> | undefined;
  let gex: Record<string, unknown> | undefined;
  let count = 0;

  const readExact = (buf: Buffer, at: number): void => {
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, at + got);
      if (n === 0) throw corrupt(o.what, `unexpected end of file at offset ${at + got}`);
      got += n;
    }
  };

  while (true) {
    if (pos === fileSize) break; // no end-of-archive blocks: tolerated, like GNU tar and Go
    if (pos + 512 > fileSize) throw corrupt(o.what, `truncated header at offset ${pos}`);
    const block = headerAt(pos);
    if (block.equals(ZERO_BLOCK)) break; // end of archive
    const fast = count >= maxMembers ? skim(block) : null;
    // biome-ignore lint/suspicious/noExplicitAny: node-tar's Header accepts HeaderData-shaped pax maps
    const h = fast ? null : new Header(block, 0, ex as any, gex as any);
    if (!(fast ?? h!).cksumValid) throw corrupt(o.what, `bad header checksum at offset ${pos}`);
    const exSize = fast && typeof ex?.size === "number" ? ex.size : undefined;
    const size = fast ? (exSize ?? fast.size) : (h!.size ?? 0);
    if (!Number.isSafeInteger(size) || size < 0) throw corrupt(o.what, `bad size at offset ${pos}`);
    const body = pos + 512;
    const next = body + Math.ceil(size / 512) * 512;
    if (body + size > fileSize) throw corrupt(o.what, `member at offset ${pos} runs past the end of the file`);
    const type = fast ? (CODE_NAMES[fast.type] ?? fast.type) : (h!.type as string);
    if (
      type === "ExtendedHeader" ||
      type === "OldExtendedHeader" ||
      type === "GlobalExtendedHeader" ||
      type === "NextFileHasLongPath" ||
      type === "OldGnuLongPath" ||
      type === "NextFileHasLongLinkpath"
    ) {
      if (size > META_MAX) throw corrupt(o.what, `oversized metadata header at offset ${pos}`);
      const buf = Buffer.alloc(size);
      readExact(buf, body);
      const text = buf.toString("utf8");
      if (type === "GlobalExtendedHeader") gex = Pax.parse(text, gex, true) as unknown as Record<string, unknown>;
      else if (type === "ExtendedHeader" || type === "OldExtendedHeader") {
        ex = Pax.parse(text, ex, false) as unknown as Record<string, unknown>;
      } else if (type === "NextFileHasLongLinkpath") ex = { ...ex, linkpath: text.replace(/\0.*/s, "") };
      else ex = { ...ex, path: text.replace(/\0.*/s, "") };
      pos = next;
      continue;
    }
    const rawPath = fast ? ((typeof ex?.path === "string" ? ex.path : null) ?? fast.path) : (h!.path ?? "");
    ex = undefined;
    if (fast) {
      // skimmed: only the top level is recorded
      const first = /^(?:\.?\/)*([^/]*)/.exec(rawPath)![1]!;
      if (first !== "") topLevel.add(first);
      count++;
      pos = next;
      continue;
    }
    const name = normalizeMemberName(rawPath);
    const mtype = typeOf(type);
    if (name !== "") topLevel.add(name.split("/")[0]!);
    count++;
    if (name !== "") {
      // a later member with the same name wins, as with tar -x
      members.set(name, {
        name,
        type: mtype,
        offset: body,
        size: mtype === "file" ? size : 0,
        linkname: h!.linkpath ?? null,
      });
    }
    pos = next;
  }
  return { members, topLevel, complete: count <= maxMembers };
}
