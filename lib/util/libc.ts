// The few syscalls node:fs lacks, through bun:ffi on glibc: extended attributes (security.capability
// and friends), mknod for device nodes and FIFOs, flock for the host's dm locks, and ioctl for
// the device-mapper status of one device by name (lib/dm/active.ts). Only path-relative "l" variants (never follow
// the final symlink) and fd variants are bound, so nothing here can write through a link.
// bun:ffi is required at the first call, not imported: a command that never locks, mknods or
// touches xattrs (list) does not pay for loading it at start-up.
type Ffi = typeof import("bun:ffi");
const ffi = (): Ffi => require("bun:ffi") as Ffi;

type Lib = ReturnType<typeof open>;

function open() {
  const { dlopen, FFIType } = ffi();
  return dlopen("libc.so.6", {
    fsetxattr: { args: [FFIType.i32, FFIType.ptr, FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i32 },
    lsetxattr: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i32 },
    llistxattr: { args: [FFIType.ptr, FFIType.ptr, FFIType.u64], returns: FFIType.i64 },
    lremovexattr: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    lgetxattr: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr, FFIType.u64], returns: FFIType.i64 },
    mknod: { args: [FFIType.ptr, FFIType.u32, FFIType.u64], returns: FFIType.i32 },
    flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  });
}

let lib: Lib | null = null;
function libc(): Lib {
  lib ??= open();
  return lib;
}

/** An errno-carrying error shaped like node's fs errors (code, errno, syscall, path). */
export class SysError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;
  constructor(syscall: string, errno: number, path?: string) {
    const code = ERRNO_NAMES[errno] ?? `E${errno}`;
    super(`${code}: ${syscall}${path ? ` '${path}'` : ""} failed (errno ${errno})`);
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }
}

// Linux x86_64/arm64 generic numbers for the codes callers care about.
const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  5: "EIO",
  12: "ENOMEM",
  13: "EACCES",
  17: "EEXIST",
  20: "ENOTDIR",
  22: "EINVAL",
  28: "ENOSPC",
  30: "EROFS",
  34: "ERANGE",
  36: "ENAMETOOLONG",
  61: "ENODATA",
  95: "EOPNOTSUPP",
  122: "EDQUOT",
};

function errno(): number {
  const p = libc().symbols.__errno_location();
  return p === null ? 0 : ffi().read.i32(p, 0);
}

/** A C string: a JS string as UTF-8, a Buffer (a path's raw bytes, bytepath.ts) as it is. */
const cstr = (s: string | Buffer): Buffer => (typeof s === "string" ? Buffer.from(`${s}\0`, "utf8") : Buffer.concat([s, Buffer.alloc(1)]));
const shown = (p: string | Buffer): string => (typeof p === "string" ? p : p.toString("latin1"));

export function fsetxattr(fd: number, name: string, value: Uint8Array): void {
  const v = value.length === 0 ? new Uint8Array(1) : value;
  if (libc().symbols.fsetxattr(fd, cstr(name), v, value.length, 0) !== 0) throw new SysError("fsetxattr", errno());
}

export function lsetxattr(path: string | Buffer, name: string, value: Uint8Array): void {
  const v = value.length === 0 ? new Uint8Array(1) : value;
  if (libc().symbols.lsetxattr(cstr(path), cstr(name), v, value.length, 0) !== 0) {
    throw new SysError("lsetxattr", errno(), shown(path));
  }
}

export function lremovexattr(path: string | Buffer, name: string): void {
  if (libc().symbols.lremovexattr(cstr(path), cstr(name)) !== 0) throw new SysError("lremovexattr", errno(), shown(path));
}

/** Names of the extended attributes of path (the link itself, never its target). */
export function llistxattr(path: string | Buffer): string[] {
  const p = cstr(path);
  for (let attempt = 0; attempt < 4; attempt++) {
    const size = Number(libc().symbols.llistxattr(p, null, 0));
    if (size < 0) throw new SysError("llistxattr", errno(), shown(path));
    if (size === 0) return [];
    const buf = Buffer.alloc(size);
    const n = Number(libc().symbols.llistxattr(p, buf, size));
    if (n < 0) {
      const e = errno();
      if (e === 34) continue; // ERANGE: the list grew in between
      throw new SysError("llistxattr", e, shown(path));
    }
    return buf
      .subarray(0, n)
      .toString("utf8")
      .split("\0")
      .filter((s) => s.length > 0);
  }
  throw new SysError("llistxattr", 34, shown(path));
}

/** Value of one extended attribute of path (not following a final symlink); null when absent. */
export function lgetxattr(path: string | Buffer, name: string): Buffer | null {
  const p = cstr(path);
  const nm = cstr(name);
  for (let attempt = 0; attempt < 4; attempt++) {
    const size = Number(libc().symbols.lgetxattr(p, nm, null, 0));
    if (size < 0) {
      const e = errno();
      if (e === 61) return null; // ENODATA
      throw new SysError("lgetxattr", e, shown(path));
    }
    const buf = Buffer.alloc(Math.max(size, 1));
    const n = Number(libc().symbols.lgetxattr(p, nm, buf, size));
    if (n < 0) {
      const e = errno();
      if (e === 34) continue;
      throw new SysError("lgetxattr", e, shown(path));
    }
    return buf.subarray(0, n);
  }
  throw new SysError("lgetxattr", 34, shown(path));
}

export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;
export const S_IFIFO = 0o010000;

/** glibc makedev(): the 64-bit dev_t encoding of major:minor. */
export function makedev(major: number, minor: number): bigint {
  const ma = BigInt(major >>> 0);
  const mi = BigInt(minor >>> 0);
  return ((ma & 0xfffff000n) << 32n) | ((ma & 0xfffn) << 8n) | ((mi & 0xffffff00n) << 12n) | (mi & 0xffn);
}

/** mknod(2): creates a node; never follows a final symlink (it fails with EEXIST instead). */
export function mknod(path: string | Buffer, mode: number, major: number, minor: number): void {
  if (libc().symbols.mknod(cstr(path), mode >>> 0, makedev(major, minor)) !== 0) {
    throw new SysError("mknod", errno(), shown(path));
  }
}

const LOCK_EX = 2;
const LOCK_NB = 4;
const LOCK_UN = 8;

/** flock(fd, LOCK_EX | LOCK_NB): true when taken, false when another open file holds it. The kernel
 * drops the lock when the holder's last descriptor closes, so a holder is always a live process. */
export function tryFlockExclusive(fd: number): boolean {
  if (libc().symbols.flock(fd, LOCK_EX | LOCK_NB) === 0) return true;
  const e = errno();
  if (e === 11 || e === 4) return false; // EWOULDBLOCK / EINTR: held elsewhere, try again later
  throw new SysError("flock", e);
}

export function unflock(fd: number): void {
  libc().symbols.flock(fd, LOCK_UN);
}

/** ioctl(fd, request, arg): 0 or the errno (SysError only for a missing libc, never for the call). */
export function ioctlErrno(fd: number, request: number, arg: Uint8Array): number {
  return libc().symbols.ioctl(fd, request, arg) === 0 ? 0 : errno();
}
