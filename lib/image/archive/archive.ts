// A read-only view of an image container — a directory or an uncompressed tar file — by member
// name. Every name a manifest hands us goes through memberName() and every lookup stays inside the
// container: no absolute paths, no "..", symlinks and hardlinks followed only within the archive.
import { lstatSync, readdirSync, realpathSync, statSync } from "node:fs";
import { join, posix, sep } from "node:path";
import { ThinimgError } from "../../errors.ts";
import { readAllCapped } from "../stream.ts";
import { indexTarFile, normalizeMemberName, type TarMember } from "./tar-index.ts";

export interface Archive {
  /** For messages: the path of the directory or the tar file. */
  readonly what: string;
  readonly kind: "dir" | "tar";
  /** Size of a readable regular-file member, or null when there is none by that name. */
  size(name: string): number | null;
  /** Raw bytes of a member (throws when missing). */
  open(name: string): ReadableStream<Uint8Array>;
  /** Read a small member whole (manifests, configs), refusing more than maxBytes. */
  read(name: string, maxBytes: number): Promise<Uint8Array>;
  /** Names at the top level (files and directories). */
  topLevel(): string[];
  /** First bytes of a member (format sniffing). */
  head(name: string, n: number): Promise<Uint8Array>;
}

/**
 * Validate a path named by a manifest: relative, no "..", no NUL or backslash tricks. Returns the
 * normalised name. `what` names the manifest for the message.
 */
export function memberName(raw: unknown, what: string): string {
  if (typeof raw !== "string" || raw === "" || raw.length > 4096 || raw.includes("\0")) {
    throw new ThinimgError("input", `${what}: invalid path ${JSON.stringify(raw)}`, {
      hint: "the image manifest is broken or hostile",
    });
  }
  const name = normalizeMemberName(raw);
  if (raw.startsWith("/") || name === "" || name.split("/").includes("..") || raw.includes("\\")) {
    throw new ThinimgError("input", `${what}: path ${JSON.stringify(raw)} leaves the archive`, {
      hint: "the image manifest is broken or hostile; refusing to read outside the archive",
    });
  }
  return name;
}

function missing(archive: string, name: string): ThinimgError {
  return new ThinimgError("input", `${archive}: member ${JSON.stringify(name)} is missing`, {
    hint: "the image archive is incomplete or its manifest is broken",
  });
}

const MAX_LINK_HOPS = 16;

/** ENOENT / ENOTDIR: the member is not there (any other error is a real failure to report). */
function isAbsent(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException | null)?.code;
  return code === "ENOENT" || code === "ENOTDIR" || code === "ELOOP";
}

export class TarArchive implements Archive {
  readonly kind = "tar" as const;
  private readonly members: Map<string, TarMember>;
  private readonly top: Set<string>;
  /** False for big archives indexed only at the top level (fine for a rootfs tarball). */
  readonly complete: boolean;

  constructor(
    readonly path: string,
    readonly what: string = path,
  ) {
    const idx = indexTarFile(path, { what });
    this.members = idx.members;
    this.top = idx.topLevel;
    this.complete = idx.complete;
  }

  /** Follow symlinks (relative to their directory) and hardlinks (archive-relative), inside only. */
  private resolve(name: string): TarMember | null {
    let cur = name;
    for (let hop = 0; hop <= MAX_LINK_HOPS; hop++) {
      const m = this.members.get(cur);
      if (!m) return null;
      if (m.type === "file") return m;
      if (m.type !== "symlink" && m.type !== "link") return null;
      const target = m.linkname ?? "";
      if (target.startsWith("/")) {
        throw new ThinimgError("input", `${this.what}: member ${cur} links outside the archive (${target})`, {
          hint: "the image archive is hostile or broken",
        });
      }
      const joined = m.type === "symlink" ? posix.join(posix.dirname(cur), target) : target;
      const next = normalizeMemberName(posix.normalize(joined));
      if (next === ".." || next.startsWith("../") || next === "") {
        throw new ThinimgError("input", `${this.what}: member ${cur} links outside the archive (${target})`, {
          hint: "the image archive is hostile or broken",
        });
      }
      cur = next;
    }
    throw new ThinimgError("input", `${this.what}: member ${name}: too many levels of links`, {
      hint: "the image archive is hostile or broken",
    });
  }

  size(name: string): number | null {
    return this.resolve(name)?.size ?? null;
  }

  open(name: string): ReadableStream<Uint8Array> {
    const m = this.resolve(name);
    if (!m) throw missing(this.what, name);
    return Bun.file(this.path)
      .slice(m.offset, m.offset + m.size)
      .stream();
  }

  async read(name: string, maxBytes: number): Promise<Uint8Array> {
    const m = this.resolve(name);
    if (!m) throw missing(this.what, name);
    return readAllCapped(this.open(name), maxBytes, `${this.what}: ${name}`);
  }

  async head(name: string, n: number): Promise<Uint8Array> {
    const m = this.resolve(name);
    if (!m) throw missing(this.what, name);
    return new Uint8Array(
      await Bun.file(this.path)
        .slice(m.offset, m.offset + Math.min(n, m.size))
        .arrayBuffer(),
    );
  }

  topLevel(): string[] {
    return [...this.top];
  }
}

export class DirArchive implements Archive {
  readonly kind = "dir" as const;
  private readonly real: string;

  constructor(
    readonly path: string,
    readonly what: string = path,
  ) {
    this.real = realpathSync(path);
  }

  /**
   * Absolute path of a regular file inside the directory (symlinks allowed only if they stay in),
   * null when there is none; throws when the name resolves outside.
   */
  file(name: string): string | null {
    return this.resolve(name);
  }

  private resolve(name: string): string | null {
    const p = join(this.path, ...name.split("/"));
    let real: string;
    try {
      real = realpathSync(p);
    } catch (e) {
      if (isAbsent(e)) return null;
      throw e; // EACCES, EIO…: resolveImage reports it with the path
    }
    if (real !== this.real && !real.startsWith(this.real + sep)) {
      throw new ThinimgError("input", `${this.what}: ${name} resolves outside the directory (${real})`, {
        hint: "the image directory contains a symlink that leaves it; refusing to read it",
      });
    }
    try {
      return statSync(real).isFile() ? real : null;
    } catch (e) {
      if (isAbsent(e)) return null;
      throw e;
    }
  }

  size(name: string): number | null {
    const p = this.resolve(name);
    return p === null ? null : statSync(p).size;
  }

  open(name: string): ReadableStream<Uint8Array> {
    const p = this.resolve(name);
    if (p === null) throw missing(this.what, name);
    return Bun.file(p).stream();
  }

  async read(name: string, maxBytes: number): Promise<Uint8Array> {
    const p = this.resolve(name);
    if (p === null) throw missing(this.what, name);
    if (statSync(p).size > maxBytes) {
      return readAllCapped(Bun.file(p).stream(), maxBytes, `${this.what}: ${name}`); // throws
    }
    return new Uint8Array(await Bun.file(p).arrayBuffer());
  }

  async head(name: string, n: number): Promise<Uint8Array> {
    const p = this.resolve(name);
    if (p === null) throw missing(this.what, name);
    return new Uint8Array(await Bun.file(p).slice(0, n).arrayBuffer());
  }

  topLevel(): string[] {
    return readdirSync(this.path);
  }

  isDirectory(name: string): boolean {
    try {
      return lstatSync(join(this.path, name)).isDirectory();
    } catch {
      return false;
    }
  }
}
