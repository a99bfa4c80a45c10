// Resolution of a parent directory INSIDE the root, like securejoin / openat2(RESOLVE_IN_ROOT):
// components are walked one by one with lstat; a symlink met on the way is re-rooted (an absolute
// target restarts at the root, ".." stops at the root), so whatever a link says, the result is a
// real directory under root with no symlink left in it. This is what containerd (fs.RootPath) and
// umoci (SecureJoinVFS) do; refusing symlinked parents instead would break real images whose later
// layers write through links of earlier ones (/lib -> usr/lib). The final component of an entry is
// never resolved here: callers lstat it and never follow it.
//
// As in securejoin, a component that does not exist (or is not a directory) is taken lexically: a
// following ".." undoes it (`l -> nope/../usr/lib` is usr/lib). Directories are created only once
// the whole path has been walked, so a ".." later in a link target never leaves a stray directory.
//
// Cost is bounded per lookup: at most MAX_SYMLINK_HOPS links (Linux's MAXSYMLINKS) and
// maxDepth + MAX_WALK_COMPONENTS components walked in all (a link target of `d/../d/../…` cannot
// multiply the work). A component already known to be a real directory is not lstat'ed again.
//
// Single writer: the layer is applied by this process alone, so a check-then-act on a path cannot
// race against an attacker; hostile input can only change the tree through our own operations,
// which call invalidate(path) for every directory or symlink they remove. Only what depended on
// that path is forgotten: resolutions whose result lies under it or that went through it.
import { chmodSync, lstatSync, mkdirSync } from "node:fs";
import { fsPath, readLink } from "./bytepath.ts";
import { DEPTH_HINT, HOSTILE_HINT, MAX_SYMLINK_HOPS, MAX_WALK_COMPONENTS, RuleError } from "./rules.ts";

/** One real path (relative to the root) we know something about; children by name. */
interface PathNode {
  readonly name: string;
  readonly parent: PathNode | null;
  kids: Map<string, PathNode> | null;
  /** Known to be a real directory (lstat'ed, created or verified by the applier). */
  dir: boolean;
  /** Lexical cache keys whose resolution depends on this path (their result, or a link on the way). */
  keys: Set<string> | null;
}

interface Resolution {
  real: string;
  node: PathNode;
  /** Symlinks the resolution went through: removing one of them invalidates it. */
  deps: PathNode[];
}

function newNode(parent: PathNode | null, name: string): PathNode {
  return { name, parent, kids: null, dir: false, keys: null };
}

function childOf(n: PathNode, name: string): PathNode {
  n.kids ??= new Map();
  let c = n.kids.get(name);
  if (c === undefined) {
    c = newNode(n, name);
    n.kids.set(name, c);
  }
  return c;
}

/**
 * One lookup in progress. parts: the path so far. Its first `verified` components are real
 * directories, whose nodes and paths are nodes[1..verified] / paths[1..verified]; the rest are
 * lexical (the first of them missing or not a directory, the others under it).
 */
interface Walk {
  parts: string[];
  nodes: PathNode[];
  paths: string[];
  verified: number;
  /** The first lexical component exists (it is a file, not missing). */
  lexExists: boolean;
  cacheable: boolean;
  deps: PathNode[];
  /** Components still to walk, last first (a link's target is pushed on top). */
  todo: string[];
  hops: number;
  steps: number;
}

/** A ".." component: drop the last part (clamped at the root, like the kernel does at "/"). */
function stepUp(w: Walk): void {
  if (w.parts.length === 0) return;
  // Undoing the first lexical component: the result depended on it not being a directory,
  // which nothing tracks, so this resolution is not cached.
  if (w.parts.length - 1 === w.verified) w.cacheable = false;
  w.parts.pop();
  if (w.verified > w.parts.length) {
    w.verified = w.parts.length;
    w.nodes.length = w.verified + 1;
    w.paths.length = w.verified + 1;
  }
}

/** The component just pushed is the real directory `node` at `rel`. */
function pushVerified(w: Walk, node: PathNode, rel: string): void {
  w.nodes.push(node);
  w.paths.push(rel);
  w.verified++;
}

/** Paths here are byte strings (bytepath.ts), the root included. */
export class InRoot {
  /** Lexical directory path (normalised, as in the archive) → its resolution. */
  private readonly cache = new Map<string, Resolution>();
  private tree: PathNode = newNode(null, "");
  /** Components walked in one lookup before it is refused. */
  private readonly budget: number;
  /** lstat calls made (for tests and benchmarks: resolution must stay cheap under hostile input). */
  lstats = 0;

  constructor(
    readonly root: string,
    private readonly maxDepth: number,
    /** Called for each directory created on the way (implicit parents). */
    private readonly onCreate: (real: string) => void,
  ) {
    this.tree.dir = true;
    this.budget = maxDepth + MAX_WALK_COMPONENTS;
  }

  abs(real: string): string {
    return real === "" ? this.root : `${this.root}/${real}`;
  }

  /**
   * Forget what depended on real path `real` (relative to root): call after removing or replacing a
   * directory or a symlink there. Without an argument (or for the root), forget everything.
   */
  invalidate(real?: string): void {
    if (real === undefined || real === "") {
      this.cache.clear();
      this.tree = newNode(null, "");
      this.tree.dir = true;
      return;
    }
    let n: PathNode | undefined = this.tree;
    for (const c of real.split("/")) {
      n = n.kids?.get(c);
      if (n === undefined) return; // nothing known under it
    }
    n.parent!.kids!.delete(n.name);
    const stack = [n];
    while (stack.length > 0) {
      const x = stack.pop()!;
      if (x.keys) for (const k of x.keys) this.cache.delete(k);
      if (x.kids) for (const k of x.kids.values()) stack.push(k);
    }
  }

  /** Record that lexical path `lex` is the real directory `real` (just created or verified). */
  remember(lex: string, real: string): void {
    const slash = lex.lastIndexOf("/");
    // It resolved through its parent's resolution: same links, so the same dependencies.
    const parent = slash < 0 ? null : this.cache.get(lex.slice(0, slash));
    if (slash >= 0 && parent === undefined) return; // the parent was not cacheable
    let node = this.tree;
    for (const c of real.split("/")) node = childOf(node, c);
    node.dir = true;
    this.store(lex, { real, node, deps: parent?.deps ?? [] });
  }

  private store(key: string, r: Resolution): void {
    this.cache.set(key, r);
    for (const n of [r.node, ...r.deps]) {
      n.keys ??= new Set();
      n.keys.add(key);
    }
  }

  /**
   * Real path (relative to root, "" for the root) of the directory named by the lexical components
   * comps[0..n). Missing components are created (mode 0755) when `create`, else null is returned
   * (also when a component is not a directory). Throws RuleError on a symlink loop, a lookup that
   * walks too much, or when creating and a component is not a directory.
   */
  dir(comps: readonly string[], n: number, create: boolean): string | null {
    if (n === 0) return "";
    let key = comps[0]!;
    for (let i = 1; i < n; i++) key += `/${comps[i]}`;
    const hit = this.cache.get(key);
    if (hit !== undefined) return hit.real;

    // Longest cached prefix, then walk the rest.
    let start = 0;
    let base: Resolution | null = null;
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
    const r = this.walk(base, comps, start, n, create);
    if (r === null) return null;
    if (r.cacheable) this.store(key, r.res);
    return r.res.real;
  }

  private walk(base: Resolution | null, comps: readonly string[], from: number, to: number, create: boolean): { res: Resolution; cacheable: boolean } | null {
    const w = this.startWalk(base, comps, from, to);
    while (w.todo.length > 0) this.step(w, w.todo.pop()!);
    if (w.verified < w.parts.length) {
      // Looking up (whiteouts, hardlink targets): a missing directory or a file in the way means
      // "does not exist", as ENOTDIR does for umoci. Creating: the layer needs a directory where a
      // file is.
      if (!create) return null;
      this.createRest(w);
    }
    return { res: { real: w.paths[w.parts.length]!, node: w.nodes[w.parts.length]!, deps: w.deps }, cacheable: w.cacheable };
  }

  /** The walk's state at its start: the cached prefix `base` (if any), comps[from..to) to do. */
  private startWalk(base: Resolution | null, comps: readonly string[], from: number, to: number): Walk {
    const w: Walk = { parts: [], nodes: [this.tree], paths: [""], verified: 0, lexExists: false, cacheable: true, deps: [], todo: [], hops: 0, steps: 0 };
    if (base !== null && base.real !== "") {
      // A cached resolution: a chain of real directories.
      const chain: PathNode[] = [];
      for (let x: PathNode | null = base.node; x !== null && x.parent !== null; x = x.parent) chain.push(x);
      for (let i = chain.length - 1; i >= 0; i--) {
        const x = chain[i]!;
        w.parts.push(x.name);
        w.nodes.push(x);
        w.paths.push(w.paths.length === 1 ? x.name : `${w.paths[w.paths.length - 1]}/${x.name}`);
      }
    }
    w.verified = w.parts.length;
    if (base !== null) w.deps = [...base.deps];
    for (let i = to - 1; i >= from; i--) w.todo.push(comps[i]!);
    return w;
  }

  /** Walk one component `c`. */
  private step(w: Walk, c: string): void {
    if (++w.steps > this.budget) {
      throw new RuleError("policy", `resolving the parent walks more than ${this.budget} path components (symbolic links expand too much)`, HOSTILE_HINT);
    }
    if (c === "..") {
      stepUp(w);
      return;
    }
    w.parts.push(c);
    if (w.parts.length > this.maxDepth) {
      throw new RuleError("policy", `path resolves deeper than ${this.maxDepth} levels (maxDepth)`, DEPTH_HINT);
    }
    if (w.verified < w.parts.length - 1) return; // under a missing component: lexical too
    const parentNode = w.nodes[w.verified]!;
    const known = parentNode.kids?.get(c);
    const rel = w.verified === 0 ? c : `${w.paths[w.verified]}/${c}`;
    if (known?.dir) {
      pushVerified(w, known, rel);
      return;
    }
    this.lstats++;
    const abs = `${this.root}/${rel}`;
    const st = lstatSync(fsPath(abs), { throwIfNoEntry: false });
    if (st?.isDirectory()) {
      const node = known ?? childOf(parentNode, c);
      node.dir = true;
      pushVerified(w, node, rel);
      return;
    }
    if (st?.isSymbolicLink()) {
      this.follow(w, known, parentNode, c, abs, rel);
      return;
    }
    // Missing, or not a directory: taken lexically from here on (a ".." may still undo it).
    w.lexExists = st !== undefined;
  }

  /** Replace the symlink just pushed (`c` in parentNode, node `known` if any, at `abs` / `rel`) by its target's components. */
  private follow(w: Walk, known: PathNode | undefined, parentNode: PathNode, c: string, abs: string, rel: string): void {
    if (++w.hops > MAX_SYMLINK_HOPS) {
      throw new RuleError("policy", `too many levels of symbolic links under ${rel} (more than ${MAX_SYMLINK_HOPS})`, HOSTILE_HINT);
    }
    w.deps.push(known ?? childOf(parentNode, c));
    const target = readLink(abs);
    w.parts.pop();
    if (target.startsWith("/")) {
      w.parts.length = 0;
      w.verified = 0;
      w.nodes.length = 1;
      w.paths.length = 1;
    }
    const tc = target.split("/");
    for (let i = tc.length - 1; i >= 0; i--) {
      const x = tc[i]!;
      if (x !== "" && x !== ".") w.todo.push(x);
    }
  }

  /** Create the walk's lexical components as directories (mode 0755). */
  private createRest(w: Walk): void {
    if (w.lexExists) {
      throw new RuleError("policy", `parent ${w.parts.slice(0, w.verified + 1).join("/")} is not a directory`, HOSTILE_HINT);
    }
    const { parts, nodes, paths } = w;
    for (let i = w.verified; i < parts.length; i++) {
      const node = childOf(nodes[i]!, parts[i]!);
      const rel = i === 0 ? parts[i]! : `${paths[i]}/${parts[i]}`;
      const p = `${this.root}/${rel}`;
      mkdirSync(fsPath(p), 0o755);
      chmodSync(fsPath(p), 0o755); // independent of the umask
      node.dir = true;
      nodes.push(node);
      paths.push(rel);
      this.onCreate(rel);
    }
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
      (slash < 0 || this.isRealDir(real.slice(0, slash), memo)) && lstatSync(fsPath(`${this.root}/${real}`), { throwIfNoEntry: false })?.isDirectory() === true;
    memo.set(real, ok);
    return ok;
  }
}
