// The house's layering (docs/architecture.md, "Layers, and what each may import"): no import cycle
// among lib/'s directories. Each directory under lib/ is one node, each file directly in lib/ its
// own; any import from one node to another (type-only ones too: they say who knows whom) is an edge.
import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const LIB = resolve(import.meta.dir, "../../lib");

function sourceFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    if (statSync(p).isDirectory()) return sourceFiles(p);
    return p.endsWith(".ts") ? [p] : [];
  });
}

const nodeOf = (file: string) => relative(LIB, file).split("/")[0]!;
const IMPORT = /^\s*(?:import|export)\s[^;]*?\sfrom\s+["'](\.{1,2}\/[^"']+)["']/gms;

/** node → node it imports → one file-level edge that shows it. */
function importGraph(files: string[]): Map<string, Map<string, string>> {
  const g = new Map<string, Map<string, string>>();
  for (const f of files) {
    const from = nodeOf(f);
    if (!g.has(from)) g.set(from, new Map());
    for (const m of readFileSync(f, "utf8").matchAll(IMPORT)) {
      const target = resolve(dirname(f), m[1]!);
      if (!target.startsWith(`${LIB}/`)) continue; // package.json and the like
      const to = nodeOf(target);
      if (to !== from && !g.get(from)!.has(to)) g.get(from)!.set(to, `${relative(LIB, f)} → ${relative(LIB, target)}`);
    }
  }
  return g;
}

/** Strongly connected components with more than one node (Tarjan). */
function cycles(g: Map<string, Map<string, string>>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const out: string[][] = [];
  const visit = (v: string) => {
    index.set(v, index.size);
    low.set(v, index.get(v)!);
    stack.push(v);
    for (const w of g.get(v)?.keys() ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (stack.includes(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) !== index.get(v)) return;
    const scc: string[] = [];
    for (let w = stack.pop()!; ; w = stack.pop()!) {
      scc.push(w);
      if (w === v) break;
    }
    if (scc.length > 1) out.push(scc.sort());
  };
  for (const v of g.keys()) if (!index.has(v)) visit(v);
  return out;
}

describe("lib/ layering", () => {
  test("no import cycle among lib/'s directories (and its top-level files)", () => {
    const g = importGraph(sourceFiles(LIB));
    const found = cycles(g).map((scc) => {
      const edges = scc.flatMap((a) => scc.filter((b) => g.get(a)?.has(b)).map((b) => `  ${a} → ${b}: ${g.get(a)!.get(b)}`));
      return `${scc.join(", ")}:\n${edges.join("\n")}`;
    });
    expect(found, `import cycles:\n${found.join("\n")}`).toEqual([]);
  });

  test("the scan sees a cycle when there is one", () => {
    const g = new Map([
      ["a", new Map([["b", "a/x.ts → b/y.ts"]])],
      ["b", new Map([["c", "b/y.ts → c/z.ts"]])],
      ["c", new Map([["a", "c/z.ts → a/x.ts"]])],
      ["d", new Map([["a", "d/w.ts → a/x.ts"]])],
    ]);
    expect(cycles(g)).toEqual([["a", "b", "c"]]);
    // and it reads real imports: the command runner queues through the lock layer
    expect(importGraph(sourceFiles(LIB)).get("exec.ts")?.get("lock")).toBe("exec.ts → lock/host-queue.ts");
  });
});
