// Index an UNCOMPRESSED tar file by member offsets without reading member bodies: read a 512-byte
// header, decode it with node-tar's Header (checksum, base-256 sizes) and Pax, then seek past the
// body. node-tar's streaming Parser would read every byte and does not report offsets; this reads
// ~1 KiB per member, so indexing a multi-GB docker-archive costs milliseconds. Members are then
// streamed by (offset, size) straight from the file — the archive is never held in memory.
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { Header, Pax } from "tar";
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
  /** Refuse archives with more members than this (an image archive has a handful). */
  maxMembers?: number;
}

const META_MAX = 1024 * 1024;

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

export function indexTarFile(path: string, o: TarIndexOptions): Map<string, TarMember> {
  const fd = openSync(path, "r");
  try {
    return indexFd(fd, o);
  } finally {
    closeSync(fd);
  }
}

function indexFd(fd: number, o: TarIndexOptions): Map<string, TarMember> {
  const fileSize = fstatSync(fd).size;
  const maxMembers = o.maxMembers ?? 1_000_000;
  const members = new Map<string, TarMember>();
  const block = Buffer.alloc(512);
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
    readExact(block, pos);
    if (block.every((b) => b === 0)) break; // end of archive
    // biome-ignore lint/suspicious/noExplicitAny: node-tar's Header accepts HeaderData-shaped pax maps
    const h = new Header(block, 0, ex as any, gex as any);
    if (!h.cksumValid) throw corrupt(o.what, `bad header checksum at offset ${pos}`);
    const size = h.size ?? 0;
    if (!Number.isSafeInteger(size) || size < 0) throw corrupt(o.what, `bad size at offset ${pos}`);
    const body = pos + 512;
    const next = body + Math.ceil(size / 512) * 512;
    if (body + size > fileSize) throw corrupt(o.what, `member at offset ${pos} runs past the end of the file`);
    const type = h.type as string;
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
    ex = undefined;
    if (++count > maxMembers) {
      throw new ThinimgError("policy", `${o.what}: more than ${maxMembers} members`, {
        hint: "an image archive holds a few files per layer; this one looks hostile",
      });
    }
    const name = normalizeMemberName(h.path ?? "");
    const mtype = typeOf(type);
    if (name !== "") {
      // a later member with the same name wins, as with tar -x
      members.set(name, {
        name,
        type: mtype,
        offset: body,
        size: mtype === "file" ? size : 0,
        linkname: h.linkpath ?? null,
      });
    }
    pos = next;
  }
  return members;
}
