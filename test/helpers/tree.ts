// Entry-by-entry description of a directory tree, for comparing our extraction with umoci's:
// type, mode, owner, mtime, size, content hash, link target, device number, xattrs, hardlink group.
// Names are read as bytes: a name that is not UTF-8 is listed escaped (\xNN), never mangled.
import { createHash } from "node:crypto";
import { lstatSync, readFileSync, type Stats } from "node:fs";
import { displayBytes, fsPath, readDir, readLink } from "../../lib/image/apply/bytepath.ts";
import { lgetxattr, llistxattr } from "../../lib/util/libc.ts";

export interface Node {
  type: string;
  mode: number;
  uid: number;
  gid: number;
  mtime?: number;
  size?: number;
  sha?: string;
  link?: string;
  rdev?: number;
  xattrs?: string;
  group?: string;
}

function typeOf(st: Stats): string {
  if (st.isFile()) return "file";
  if (st.isDirectory()) return "dir";
  if (st.isSymbolicLink()) return "symlink";
  if (st.isCharacterDevice()) return "char";
  if (st.isBlockDevice()) return "block";
  if (st.isFIFO()) return "fifo";
  return "socket";
}

export interface ListOptions {
  /** Compare directory mtimes too (default true). */
  dirMtimes?: boolean;
  /** Top-level names to leave out (e.g. ext4's lost+found). */
  skipTop?: string[];
}

export function listTree(root: string, o: ListOptions = {}): Map<string, Node> {
  const dirMtimes = o.dirMtimes ?? true;
  const skipTop = new Set(o.skipTop ?? []);
  const out = new Map<string, Node>();
  const inodes = new Map<number, string[]>();
  const top = byteRoot(root);
  // rel: a byte string (apply/bytepath.ts); keys are its printable form
  const walk = (rel: string) => {
    const abs = fsPath(rel === "." ? top : `${top}/${rel}`);
    const key = rel === "." ? rel : displayBytes(rel, Number.POSITIVE_INFINITY);
    const st = lstatSync(abs);
    const type = typeOf(st);
    const n: Node = { type, mode: type === "symlink" ? 0 : st.mode & 0o7777, uid: st.uid, gid: st.gid }; // symlink modes mean nothing on Linux
    if (type !== "dir" || dirMtimes) n.mtime = Math.floor(st.mtimeMs / 1000);
    if (st.isFile()) {
      n.size = st.size;
      n.sha = createHash("sha256").update(readFileSync(abs)).digest("hex");
      if (st.nlink > 1) inodes.set(st.ino, [...(inodes.get(st.ino) ?? []), key]);
    }
    if (st.isSymbolicLink()) n.link = displayBytes(readLink(rel === "." ? top : `${top}/${rel}`), Number.POSITIVE_INFINITY);
    if (st.isCharacterDevice() || st.isBlockDevice()) n.rdev = st.rdev;
    const names = llistxattr(abs)
      .filter((k) => k !== "security.selinux")
      .sort();
    if (names.length > 0) n.xattrs = names.map((k) => `${k}=${lgetxattr(abs, k)?.toString("hex")}`).join(",");
    out.set(key, n);
    if (st.isDirectory()) {
      const names = readDir(rel === "." ? top : `${top}/${rel}`).map((d) => d.name);
      for (const c of names.sort()) if (!(rel === "." && skipTop.has(c))) walk(rel === "." ? c : `${rel}/${c}`);
    }
  };
  walk(".");
  for (const paths of inodes.values()) {
    const g = paths.sort().join("|");
    for (const p of paths) out.get(p)!.group = g;
  }
  return out;
}

/** A JS path (UTF-8) as a byte string. */
const byteRoot = (p: string): string => Buffer.from(p, "utf8").toString("latin1");

/** Every difference between two trees, one line each; [] when identical. */
export function diffTrees(want: Map<string, Node>, got: Map<string, Node>): string[] {
  const lines: string[] = [];
  for (const [p, a] of want) {
    const b = got.get(p);
    if (!b) {
      lines.push(`${p}: missing`);
      continue;
    }
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)]) as Set<keyof Node>) {
      if (a[k] !== b[k]) lines.push(`${p}: ${k} ${String(a[k])} != ${String(b[k])}`);
    }
  }
  for (const p of got.keys()) if (!want.has(p)) lines.push(`${p}: extra`);
  return lines;
}
