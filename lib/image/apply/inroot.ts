// Resolution of a parent directory INSIDE the root, like securejoin / openat2(RESOLVE_IN_ROOT):
// components are walked one by one with lstat; a symlink met on the way is re-rooted (an absolute
// target restarts at the root, ".." stops at the root), so whatever a link says, the result is a
// real directory under root with no symlink left in it. This is what containerd (fs.RootPath) and
// umoci (SecureJoinVFS) do; refusing symlinked parents instead would break real images whose later
// layers write through links of earlier ones (/lib -> usr/lib). The final component of an entry is
// never resolved here: callers lstat it and never follow it.
//
// Single writer: the layer is applied by this process alone, so a check-then-act on a path cannot
// race against an attacker; hostile input can only change the tree through our own operations,
// which invalidate the cache (see invalidate()).
import { chmodSync, lstatSync, mkdirSync, readlinkSync } from "node:fs";
import { HOSTILE_HINT, MAX_SYMLINK_HOPS, RuleError } from "./rules.ts";

export class InRoot {
  /** Lexical directory path (normalised, as in the archive) → real path relative to root. */
  private readonly cache = new Map<string, string>();

  constructor(
    readonly root: string,
    private readonly maxDepth: number,
    /** Called for each directory created on the way (implicit parents). */
    private readonly onCreate: (real: string) => void,
  ) {}

  abs(real: string): string {
    return real === "" ? this.root : `${this.root}/${real}`;
  }

  /** Forget every resolution: call after removing or replacing a directory or a symlink. */
  invalidate(): void {
    this.cache.clear();
  }

  /** Record that lexical path `lex` is the real directory `real` (just created or verified). */
  remember(lex: string, real: string): void {
    this.cache.set(lex, real);
  }

  /**
   * Real path (relative to root, "" for the root) of the directory named by the lexical components
   * comps[0..n). Missing components are created (mode 0755) when `create`, else null is returned
   * (also when a component is not a directory). Throws RuleError on a symlink loop, or when
   * creating and a component is not a directory.
   */
  dir(comps: readonly string[], n: number, create: boolean): string | null {
    if (n === 0) return "";
    let key = comps[0]!;
    for (let i = 1; i < n; i++) key += `/${comps[i]}`;
    const hit = this.cache.get(key);
    if (hit !== undefined) return hit;

    // Longest cached prefix, then walk the rest.
    let start = 0;
    let base = "";
    let k = key;
    for (let i = n - 1; i > 0; i--) {
      k = k.slice(0, k.lastIndexOf("/"));
      const h = this.cache.get(k);
      if (h !== undefined) {
        start = i;
        base = h;
        break;
      }
    }
    const real = this.walk(base, comps.slice(start, n), create);
    if (real !== null) this.cache.set(key, real);
    return real;
  }

  private walk(base: string, rest: string[], create: boolean): string | null {
    const parts = base === "" ? [] : base.split("/");
    let queue = rest;
    let hops = 0;
    let missing = false; // once a component was created, the rest cannot exist
    for (let i = 0; i < queue.length; i++) {
      const c = queue[i]!;
      if (c === "" || c === ".") continue;
      if (c === "..") {
        parts.pop(); // clamps at the root, like the kernel does at "/"
        continue;
      }
      parts.push(c);
      if (parts.length > this.maxDepth) {
        throw new RuleError("policy", `path resolves deeper than ${this.maxDepth} levels (maxDepth)`, HOSTILE_HINT);
      }
      const p = `${this.root}/${parts.join("/")}`;
      const st = missing ? undefined : lstatSync(p, { throwIfNoEntry: false });
      if (st === undefined) {
        if (!create) return null;
        mkdirSync(p, 0o755);
        chmodSync(p, 0o755); // independent of the umask
        missing = true;
        this.onCreate(parts.join("/"));
        continue;
      }
      if (st.isDirectory()) continue;
      if (st.isSymbolicLink()) {
        if (++hops > MAX_SYMLINK_HOPS) {
          throw new RuleError(
            "policy",
            `too many levels of symbolic links under ${parts.join("/")} (more than ${MAX_SYMLINK_HOPS})`,
            HOSTILE_HINT,
          );
        }
        const target = readlinkSync(p);
        parts.pop();
        if (target.startsWith("/")) parts.length = 0;
        queue = [...target.split("/"), ...queue.slice(i + 1)];
        i = -1;
        continue;
      }
      // Looking up (whiteouts, hardlink targets): a file in the way means "does not exist", as
      // ENOTDIR does for umoci. Creating: the layer needs a directory where a file is.
      if (!create) return null;
      throw new RuleError("policy", `parent ${parts.join("/")} is not a directory`, HOSTILE_HINT);
    }
    return parts.join("/");
  }

  /**
   * True when real (relative) path is a chain of real directories, no symlink anywhere. `memo`
   * carries answers between calls, so checking every directory of a deep tree stays linear.
   */
  isRealDir(real: string, memo: Map<string, boolean>): boolean {
    if (real === "") return true;
    const known = memo.get(real);
    if (known !== undefined) return known;
    const slash = real.lastIndexOf("/");
    const ok =
      (slash < 0 || this.isRealDir(real.slice(0, slash), memo)) &&
      lstatSync(`${this.root}/${real}`, { throwIfNoEntry: false })?.isDirectory() === true;
    memo.set(real, ok);
    return ok;
  }
}
