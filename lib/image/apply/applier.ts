// Applies the entries of one layer to a root directory, synchronously, as the tar reader hands
// them over. Semantics follow umoci/containerd (docs/layer-apply.md): whiteouts and opaque
// whiteouts remove only what lower layers left (never what this layer created, whatever the entry
// order), a later entry for the same path wins, directory metadata is applied at the end of the
// layer deepest first, and lower directories this layer only wrote into keep their times.
//
// Safety: every parent is resolved inside the root (inroot.ts); the final component is never
// followed — files are created with O_CREAT|O_EXCL|O_NOFOLLOW after removing what was there, and
// metadata goes through the fd or l* calls. Directory metadata applied at the end re-checks that the
// path is still a plain directory chain when anything was replaced in between.
import {
  chmodSync,
  closeSync,
  constants,
  fchmodSync,
  fchownSync,
  ftruncateSync,
  futimesSync,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  openSync,
  renameSync,
  rmdirSync,
  type Stats,
  symlinkSync,
  unlinkSync,
  writeSync,
} from "node:fs";
import { fsetxattr, lgetxattr, llistxattr, lremovexattr, lsetxattr, mknod, S_IFBLK, S_IFCHR, S_IFIFO } from "../../util/libc.ts";
import { fsPath, readDir } from "./bytepath.ts";
import { type FileMeta, type FileOut, finishFd, OP_FIELDS, packMeta } from "./file-out.ts";
import { InRoot } from "./inroot.ts";
import { checkNameBytes, DEPTH_HINT, HOSTILE_HINT, type Limits, RuleError, splitName } from "./rules.ts";
import type { TarEntry, TarSink } from "./tar-reader.ts";

const WH_PREFIX = ".wh.";
const WH_META_PREFIX = ".wh..wh.";
const WH_OPAQUE = ".wh..wh..opq";
const S_ISGID = 0o2000;

// Bun opens every fd close-on-exec already.
const O_CREATE_FILE = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

const FD_CALLS = { ftruncateSync, fchownSync, fchmodSync, futimesSync, closeSync };

/** xattrs that steer an overlayfs mount: an image must not be able to set them. */
const FORBIDDEN_XATTR_PREFIX = "trusted.overlay.";
/** Labels the host's LSM owns; never cleared from an existing directory (umoci does the same). */
const KEEP_XATTRS = new Set(["security.selinux"]);
/** uid_t/gid_t are 32 bits and (uid_t)-1 means "unchanged" to chown. */
const MAX_ID = 0xfffffffe;

interface Times {
  atime: number;
  mtime: number;
}

interface DirRecord extends Times {
  name: string;
  mode: number;
  uid: number;
  gid: number;
  xattrs: Map<string, Buffer> | null;
  /** The directory existed before this entry (its old xattrs must go). */
  merged: boolean;
  epoch: number;
}

interface TimesRecord extends Times {
  epoch: number;
}

export interface ApplierOptions {
  limits: Limits;
  devices: boolean;
  sameOwner: boolean;
  xattrs: boolean;
  isRoot: boolean;
  /** Where regular files' data and metadata go (file-out.ts); absent: written on this thread. */
  out?: FileOut | null;
}

export class Applier implements TarSink {
  readonly fs: InRoot;
  entries = 0;
  whiteouts = 0;
  skipped = 0;
  /** Bytes of holes in the sparse files so far (their apparent size beyond the data stored). */
  sparseBytes = 0;
  /** Name of the entry being applied, for error messages. */
  current: string | null = null;

  /** Real paths this layer created, and their ancestors: whiteouts never remove these. */
  private readonly upper = new Set<string>();
  /** Directory entries of this layer: metadata applied at the end, deepest first. */
  private readonly dirs = new Map<string, DirRecord>();
  /** Times of pre-existing directories this layer wrote into, restored at the end. */
  private readonly parentTimes = new Map<string, TimesRecord>();
  /**
   * Directories known to hold nothing from lower layers (created by this layer, or already swept
   * by a whiteout): sweeping them again is a no-op, so repeated markers cost nothing.
   */
  private readonly clean = new Set<string>();
  /** Bumped whenever a directory or symlink is removed: recorded paths must be re-checked. */
  private epoch = 0;
  /**
   * Directories known to have no setgid bit now (modes are applied only in finish()): a file
   * created in one gets exactly our euid/egid, so an entry owned by them needs no chown.
   */
  private readonly plainGroup = new Set<string>();
  private readonly euid = process.geteuid?.() ?? -1;
  private readonly egid = process.getegid?.() ?? -1;

  // The regular file being written, and the real path of its directory.
  private fd = -1;
  private file: TarEntry | null = null;
  private fileDir = "";
  /** Its id in `o.out` when its data and metadata go there; -1 when written on this thread. */
  private fileId = -1;
  /** Scratch record for finishFd on this thread. */
  private readonly meta = new Float64Array(OP_FIELDS);

  constructor(
    root: string,
    private readonly o: ApplierOptions,
  ) {
    this.fs = new InRoot(root, o.limits.maxDepth, (real) => {
      this.addUpper(real);
      this.clean.add(real);
      this.createdDir(real);
    });
    if ((lstatSync(fsPath(root)).mode & S_ISGID) === 0) this.plainGroup.add("");
  }

  entry(e: TarEntry): void {
    this.outFailed();
    this.current = e.name;
    const comps = this.check(e);
    const n = comps.length;
    const base = n > 0 ? comps[n - 1]! : "";
    if (base.startsWith(WH_PREFIX)) {
      this.whiteout(comps, base);
      return;
    }

    if (n === 0) {
      // An entry for the root itself: only its metadata can change.
      if (e.type !== "dir") throw new RuleError("policy", "a non-directory entry replaces the root", HOSTILE_HINT);
      this.recordDir("", e, true);
      return;
    }

    const parent = this.fs.dir(comps, n - 1, true)!;
    const real = parent === "" ? base : `${parent}/${base}`;
    const abs = `${this.fs.root}/${real}`;
    this.touchParent(parent);

    switch (e.type) {
      case "dir": {
        const st = lstatSync(fsPath(abs), { throwIfNoEntry: false });
        const merged = st?.isDirectory() === true;
        if (!merged) {
          if (st) this.remove(abs, st);
          mkdirSync(fsPath(abs), 0o700);
          this.clean.add(real);
          this.createdDir(real);
        } else if ((st.mode & S_ISGID) === 0) this.plainGroup.add(real);
        else this.plainGroup.delete(real);
        this.recordDir(real, e, merged);
        this.fs.remember(comps.join("/"), real);
        break;
      }
      case "file":
        this.fd = this.create(abs, () => openSync(fsPath(abs), O_CREATE_FILE, 0o600));
        this.file = e;
        this.fileDir = parent;
        // fsetxattr needs libc, which the other thread does not load: such files are written here.
        this.fileId = this.o.out && !(e.xattrs && this.o.xattrs) ? this.o.out.begin(e.name) : -1;
        break;
      case "symlink":
        checkNameBytes(e.linkname, this.o.limits, "symlink target");
        if (e.linkname === "") throw new RuleError("input", "symlink with an empty target");
        // Written exactly as in the archive: absolute and climbing targets are legal in images;
        // they are only ever followed by resolution inside the root.
        this.create(abs, () => symlinkSync(fsPath(e.linkname), fsPath(abs)));
        this.finishNode(abs, parent, e, false);
        break;
      case "link":
        this.hardlink(abs, e);
        break;
      case "char":
      case "block":
      case "fifo":
        // Only with `devices`, and only as root: a FIFO made by an unprivileged run would belong to
        // the wrong owner, so it is skipped (counted) like the rest.
        if (!this.o.devices || (e.type === "fifo" && !this.o.isRoot)) {
          this.skipped++;
          return;
        }
        if (!this.o.isRoot) {
          throw new RuleError("policy", "device nodes can only be created as root", "run as root, or do not ask for device nodes (extract --devices)");
        }
        this.create(abs, () => mknod(fsPath(abs), (e.type === "char" ? S_IFCHR : e.type === "block" ? S_IFBLK : S_IFIFO) | 0o600, e.devmajor, e.devminor));
        this.finishNode(abs, parent, e, true);
        break;
    }
    this.addUpper(real);
  }

  /** The entry's limits and rules (counted against the layer's budget); its name's components. */
  private check(e: TarEntry): string[] {
    const L = this.o.limits;
    if (++this.entries > L.maxEntries) {
      throw new RuleError("policy", `more than ${L.maxEntries} entries (maxEntries)`, "raise --max-entries / THINIMG_MAX_ENTRIES if the image is legitimate");
    }
    checkNameBytes(e.name, L, "path");
    const comps = splitName(e.name);
    if (comps.length > L.maxDepth) {
      throw new RuleError("policy", `path is deeper than ${L.maxDepth} levels (maxDepth)`, DEPTH_HINT);
    }
    if (e.type === "file") {
      if (e.size > L.maxFileBytes) {
        throw new RuleError(
          "policy",
          `file of ${e.size} bytes exceeds the ${L.maxFileBytes}-byte limit (maxFileBytes)`,
          "raise --max-file-size / THINIMG_MAX_FILE_SIZE if the image is legitimate",
        );
      }
      // Holes count: a sparse file costs its apparent size against the layer's budget.
      if (e.offset + 512 + e.size + this.sparseBytes > L.maxTotalBytes) {
        throw new RuleError(
          "policy",
          `layer would exceed ${L.maxTotalBytes} bytes (maxTotalBytes)`,
          "raise --max-bytes / THINIMG_MAX_LAYER_SIZE if the image is legitimate",
        );
      }
    }

    if (e.sparse) this.sparseBytes += e.size - e.sparse.reduce((n, r) => n + r.length, 0);
    if (e.uid > MAX_ID || e.gid > MAX_ID || e.uid < 0 || e.gid < 0) throw new RuleError("input", `uid/gid ${e.uid}:${e.gid} out of range`);
    if (e.xattrs) for (const k of e.xattrs.keys()) checkXattr(k);

    const n = comps.length;
    for (let i = 0; i < n - 1; i++) {
      // A marker is only ever a last component; as a directory it would appear in the result.
      if (comps[i]!.startsWith(WH_PREFIX)) throw new RuleError("policy", "a whiteout name used as a directory", HOSTILE_HINT);
    }
    return comps;
  }

  data(buf: Buffer, off: number, len: number, pos: number): void {
    const fd = this.fd;
    if (fd < 0) return; // a whiteout marker with content: ignored
    if (this.fileId >= 0 && this.o.out!.write(fd, this.fileId, buf, off, len, pos)) return;
    while (len > 0) {
      const w = writeSync(fd, buf, off, len, pos);
      off += w;
      len -= w;
      pos += w;
    }
  }

  fileEnd(): void {
    const fd = this.fd;
    const e = this.file;
    if (fd < 0 || e === null) return;
    this.fd = -1;
    this.file = null;
    const m: FileMeta = {
      // A new file already has our euid/egid unless its directory is setgid (then it has the
      // directory's group): no chown then.
      chown: this.o.sameOwner && !this.ownedAlready(e, this.fileDir),
      uid: e.uid,
      gid: e.gid,
      mode: e.mode,
      atime: e.atime ?? e.mtime,
      mtime: e.mtime,
      // A sparse file's holes were never written: the size is set, no zeros are.
      truncate: e.sparse ? e.size : -1,
    };
    if (this.fileId >= 0) {
      this.o.out!.end(fd, this.fileId, m);
      return;
    }
    packMeta(this.meta, 0, m);
    const xattrs = e.xattrs && this.o.xattrs ? e.xattrs : null;
    const setXattrs = (f: number) => {
      for (const [k, v] of xattrs!) fsetxattr(f, k, v);
    };
    finishFd(FD_CALLS, fd, this.meta, 0, xattrs ? setXattrs : undefined);
  }

  /** Close what is open after an error. */
  abort(): void {
    if (this.fd >= 0) {
      try {
        if (this.fileId >= 0) this.o.out!.close(this.fd);
        else closeSync(this.fd);
      } catch {}
      this.fd = -1;
    }
  }

  /** A write or metadata call queued to `o.out` failed: the layer fails, naming that file. */
  private outFailed(): void {
    const f = this.o.out?.failure();
    if (!f) return;
    this.current = f.name;
    throw f.error;
  }

  /** End of the layer: directory metadata deepest first, then restore untouched parents' times. */
  finish(): void {
    this.outFailed();
    const recs = [...this.dirs].map(([real, r]) => ({ real, r, d: depth(real) })).sort((a, b) => b.d - a.d);
    const verified = new Map<string, boolean>();
    for (const { real, r } of recs) {
      this.current = r.name;
      if (r.epoch !== this.epoch && !this.fs.isRealDir(real, verified)) continue; // replaced later in the layer
      const abs = this.fs.abs(real);
      const ap = fsPath(abs);
      if (this.o.sameOwner) lchownSync(ap, r.uid, r.gid);
      chmodSync(ap, r.mode); // a verified directory, not a link
      if (this.o.xattrs) this.setDirXattrs(ap, r);
      lutimesSync(ap, ts(r.atime), ts(r.mtime));
    }
    for (const [real, t] of this.parentTimes) {
      if (this.dirs.has(real)) continue;
      this.current = real === "" ? "/" : real;
      if (t.epoch !== this.epoch && !this.fs.isRealDir(real, verified)) continue;
      lutimesSync(fsPath(this.fs.abs(real)), t.atime, t.mtime);
    }
    this.current = null;
  }

  // --- helpers -------------------------------------------------------------------------------

  private recordDir(real: string, e: TarEntry, merged: boolean): void {
    this.dirs.set(real, {
      name: e.name,
      mode: e.mode,
      uid: e.uid,
      gid: e.gid,
      atime: e.atime ?? e.mtime,
      mtime: e.mtime,
      xattrs: e.xattrs,
      merged,
      epoch: this.epoch,
    });
  }

  private setDirXattrs(abs: string | Buffer, r: DirRecord): void {
    if (r.merged) {
      // The entry describes the directory completely: attributes it does not list go.
      for (const k of llistxattr(abs)) {
        if (!KEEP_XATTRS.has(k) && !r.xattrs?.has(k)) lremovexattr(abs, k);
      }
    }
    if (!r.xattrs) return;
    for (const [k, v] of r.xattrs) {
      if (r.merged) {
        const old = lgetxattr(abs, k);
        if (old?.equals(v)) continue;
      }
      lsetxattr(abs, k, v);
    }
  }

  /** Owner, mode (not for symlinks), xattrs, times of a just-created non-directory, by path. */
  private finishNode(absName: string, dir: string, e: TarEntry, chmod: boolean): void {
    const abs = fsPath(absName);
    if (this.o.sameOwner && !this.ownedAlready(e, dir)) lchownSync(abs, e.uid, e.gid);
    if (chmod) chmodSync(abs, e.mode); // a node we just created (mknod never follows links)
    if (e.xattrs && this.o.xattrs) {
      for (const [k, v] of e.xattrs) lsetxattr(abs, k, v);
    }
    lutimesSync(abs, ts(e.atime ?? e.mtime), ts(e.mtime));
  }

  /** Run an exclusive create; if something is in the way, remove it (never following it) and retry. */
  private create<T>(abs: string, make: () => T): T {
    try {
      return make();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
    const st = lstatSync(fsPath(abs), { throwIfNoEntry: false });
    if (st) this.remove(abs, st);
    return make();
  }

  private remove(abs: string, st: Stats): void {
    if (st.isDirectory()) {
      this.removeDir(abs);
      this.bump(abs);
    } else {
      unlinkSync(fsPath(abs));
      if (st.isSymbolicLink()) this.bump(abs);
    }
  }

  /**
   * rm -r that never follows a symlink: non-directories are unlinked by name, directories (by
   * d_type, or lstat when the filesystem does not say) are emptied. Each subdirectory is first
   * renamed into a scratch directory at the top of the root, so every syscall uses a short path:
   * removing a maxDepth-deep chain costs O(entries), not O(depth²) path walks (Bun's rmSync takes
   * ~12 s on a 1024-deep chain; a hostile layer could repeat that ~100 times).
   */
  private removeDir(abs: string): void {
    let scratch: string | null = null;
    let n = 0;
    const queue = [abs];
    try {
      while (queue.length > 0) {
        const d = queue.pop()!;
        for (const de of readDir(d)) {
          const p = `${d}/${de.name}`;
          if (de.dir) {
            scratch ??= this.makeScratch();
            const t = `${scratch}/${n++}`;
            renameSync(fsPath(p), fsPath(t));
            queue.push(t);
          } else {
            unlinkSync(fsPath(p));
          }
        }
        rmdirSync(fsPath(d));
      }
    } finally {
      if (scratch !== null) rmdirSync(fsPath(scratch));
    }
  }

  private makeScratch(): string {
    this.touchParent(""); // the scratch comes and goes in the root: its times are restored at the end
    for (let i = 0; ; i++) {
      const p = `${this.fs.root}/.thinimg-rm-${process.pid}-${Math.random().toString(36).slice(2)}`;
      try {
        mkdirSync(fsPath(p), 0o700);
        return p;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "EEXIST" || i > 8) throw e;
      }
    }
  }

  /** A directory or symlink at abs was removed: recorded paths must be re-checked. */
  private bump(abs: string): void {
    this.epoch++;
    this.fs.invalidate(abs.slice(this.fs.root.length + 1));
  }

  private hardlink(abs: string, e: TarEntry): void {
    checkNameBytes(e.linkname, this.o.limits, "hardlink target");
    const t = splitName(e.linkname, "hardlink target");
    if (t.length === 0) throw new RuleError("policy", "hardlink to the root", HOSTILE_HINT);
    if (t[t.length - 1]!.startsWith(WH_PREFIX)) {
      throw new RuleError("input", "hardlink to a whiteout marker", HOSTILE_HINT);
    }
    // The target's parents resolve inside the root; its last component is not followed (a
    // hardlink to a symlink links the symlink itself, as link(2), GNU tar and umoci do).
    const parent = this.fs.dir(t, t.length - 1, false);
    const target = parent === null ? null : this.fs.abs(parent === "" ? t[t.length - 1]! : `${parent}/${t[t.length - 1]}`);
    const st = target === null ? undefined : lstatSync(fsPath(target), { throwIfNoEntry: false });
    if (target === null || st === undefined) {
      throw new RuleError("input", `hardlink target ${e.linkname} does not exist`, "the layer is malformed");
    }
    if (st.isDirectory()) throw new RuleError("policy", "hardlink to a directory", HOSTILE_HINT);
    if (target === abs) return; // already itself
    this.create(abs, () => linkSync(fsPath(target), fsPath(abs)));
  }

  private whiteout(comps: string[], base: string): void {
    this.whiteouts++;
    const n = comps.length;
    let opaque = false;
    let name = "";
    if (base === WH_OPAQUE) opaque = true;
    else if (base.startsWith(WH_META_PREFIX))
      return; // other AUFS metadata (.wh..wh.plnk…): ignored, as containerd does
    else {
      name = base.slice(WH_PREFIX.length);
      if (name === "" || name === "." || name === "..") {
        throw new RuleError("policy", `whiteout names "${name}"`, HOSTILE_HINT);
      }
    }
    // The directory the marker sits in, resolved inside the root; never created.
    const dir = this.fs.dir(comps, n - 1, false);
    if (dir === null) return;
    const dirAbs = this.fs.abs(dir);
    const st = lstatSync(fsPath(dirAbs), { throwIfNoEntry: false });
    if (!st?.isDirectory()) return;
    this.touchParent(dir);
    if (opaque) {
      if (this.clean.has(dir)) return;
      for (const c of readDir(dirAbs)) this.removeLower(dir === "" ? c.name : `${dir}/${c.name}`);
      this.clean.add(dir);
    } else {
      this.removeLower(dir === "" ? name : `${dir}/${name}`);
    }
  }

  /** Remove real path unless this layer created it; descend into directories that hold such paths. */
  private removeLower(real: string): void {
    const abs = this.fs.abs(real);
    const st = lstatSync(fsPath(abs), { throwIfNoEntry: false });
    if (!st) return;
    if (!this.upper.has(real)) {
      this.remove(abs, st);
      return;
    }
    if (this.clean.has(real)) return;
    if (st.isDirectory()) {
      for (const c of readDir(abs)) this.removeLower(`${real}/${c.name}`);
      this.clean.add(real);
    }
  }

  /** A node just made in real directory `dir` already has the entry's owner (see plainGroup). */
  private ownedAlready(e: TarEntry, dir: string): boolean {
    return e.uid === this.euid && e.gid === this.egid && this.plainGroup.has(dir);
  }

  /** mkdir inherits the setgid bit of the parent: a new directory is plain when its parent is. */
  private createdDir(real: string): void {
    const slash = real.lastIndexOf("/");
    if (this.plainGroup.has(slash < 0 ? "" : real.slice(0, slash))) this.plainGroup.add(real);
    else this.plainGroup.delete(real);
  }

  private addUpper(real: string): void {
    for (let p = real; p !== "" && !this.upper.has(p); p = p.slice(0, Math.max(0, p.lastIndexOf("/")))) {
      this.upper.add(p);
    }
  }

  /** First write into a directory this layer has no entry for (yet): remember its times. */
  private touchParent(real: string): void {
    if (this.dirs.has(real) || this.parentTimes.has(real)) return;
    const st = lstatSync(fsPath(this.fs.abs(real)));
    if ((st.mode & S_ISGID) === 0) this.plainGroup.add(real);
    this.parentTimes.set(real, { atime: st.atimeMs / 1000, mtime: st.mtimeMs / 1000, epoch: this.epoch });
  }
}

/** node:fs turns a negative number of seconds into "now"; a Date keeps times before 1970. */
const ts = (s: number): number | Date => (s < 0 ? new Date(s * 1000) : s);

function depth(real: string): number {
  if (real === "") return 0;
  let d = 1;
  for (let i = 0; i < real.length; i++) if (real.charCodeAt(i) === 47) d++;
  return d;
}

function checkXattr(name: string): void {
  if (name.startsWith(FORBIDDEN_XATTR_PREFIX)) {
    throw new RuleError("policy", `xattr ${name} is not allowed (it controls overlayfs)`, HOSTILE_HINT);
  }
}
