// Index an UNCOMPRESSED tar file by member offsets without reading member bodies: read a 512-byte
// header, decode it with the one header decoder (tar-format.ts: checksum, base-256 numbers, PAX, GNU
// long names and sparse maps), then seek past the body. A streaming parser would read every byte
// and does not report offsets; this reads ~1 KiB per member, so indexing a multi-GB docker-archive
// costs milliseconds. Members are then streamed by (offset, size) straight from the file — the
// archive is never held in memory. Malformed input is one line naming the offset.
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { ThinimgError } from "../../errors.ts";
import { BLOCK, HeaderDecoder, padOf, type TarEntry, TarFormatError } from "./tar-format.ts";

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

/** "./a//b/" → "a/b"; keeps ".." segments (callers decide what to do with them). */
export function normalizeMemberName(name: string): string {
  return name
    .split("/")
    .filter((s) => s !== "" && s !== ".")
    .join("/");
}

function corrupt(what: string, detail: string, unsupported = false): ThinimgError {
  return new ThinimgError("input", `${what}: not a valid tar archive (${detail})`, {
    hint: unsupported
      ? "the archive uses a tar feature thinimg does not support (see docs/layer-apply.md)"
      : "the file is damaged, truncated or not an image archive",
  });
}

export function indexTarFile(path: string, o: TarIndexOptions): TarIndex {
  const fd = openSync(path, "r");
  try {
    return indexFd(fd, o);
  } catch (e) {
    if (e instanceof TarFormatError) throw corrupt(o.what, e.message.replace(/^not a tar archive \((.*)\)$/, "$1"), e.unsupported);
    throw e;
  } finally {
    closeSync(fd);
  }
}

/** Byte-string names (tar-format.ts) as the UTF-8 names manifests use. */
const utf8Name = (s: string): string => (/[^\x00-\x7f]/.test(s) ? Buffer.from(s, "latin1").toString("utf8") : s);

function memberType(e: TarEntry, map1x0: boolean): MemberType {
  if (e.type === "file") return e.sparse || map1x0 ? "other" : "file"; // a sparse file is no blob
  if (e.type === "dir" || e.type === "symlink" || e.type === "link") return e.type;
  return "other";
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
  const blockAt = (at: number): Buffer => {
    if (at + BLOCK > fileSize) throw corrupt(o.what, `truncated header at offset ${at}`);
    if (winStart < 0 || at < winStart || at + BLOCK > winStart + winLen) {
      winLen = readSync(fd, win, 0, Math.min(win.length, fileSize - at), at);
      winStart = at;
      if (winLen < BLOCK) throw corrupt(o.what, `unexpected end of file at offset ${at + winLen}`);
    }
    return win.subarray(at - winStart, at - winStart + BLOCK);
  };
  const readExact = (buf: Buffer, at: number): void => {
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, at + got);
      if (n === 0) throw corrupt(o.what, `unexpected end of file at offset ${at + got}`);
      got += n;
    }
  };
  const dec = new HeaderDecoder();
  let pos = 0;
  let count = 0;

  for (;;) {
    if (pos === fileSize) {
      dec.end(pos); // no end-of-archive blocks: tolerated, like GNU tar and Go
      break;
    }
    const at = pos;
    const step = dec.block(blockAt(at), 0, at);
    pos += BLOCK;
    if (step.kind === "zero") continue;
    if (step.kind === "eof") break;
    if (step.kind === "meta" || step.kind === "skip") {
      if (pos + step.size > fileSize) throw corrupt(o.what, `member at offset ${at} runs past the end of the file`);
      if (step.kind === "meta") {
        const buf = Buffer.alloc(step.size);
        readExact(buf, pos);
        dec.meta(buf, pos);
      }
      pos += step.size + padOf(step.size);
      continue;
    }
    const e = step.entry;
    // old-GNU sparse extension blocks sit between the header and the data
    for (let more = step.ext; more; pos += BLOCK) more = dec.sparseExt(e, step.stored, blockAt(pos), 0, pos);
    const body = pos;
    if (body + step.stored > fileSize) throw corrupt(o.what, `member at offset ${at} runs past the end of the file`);
    pos = body + step.stored + padOf(step.stored);
    const name = normalizeMemberName(utf8Name(e.name));
    if (name !== "") topLevel.add(name.split("/")[0]!);
    // past maxMembers only the top level is recorded
    if (++count > maxMembers || name === "") continue;
    const type = memberType(e, step.map1x0);
    // a later member with the same name wins, as with tar -x
    members.set(name, {
      name,
      type,
      offset: body,
      size: type === "file" ? step.stored : 0,
      linkname: e.type === "link" || e.type === "symlink" ? utf8Name(e.linkname) : null,
    });
  }
  return { members, topLevel, complete: count <= maxMembers };
}
