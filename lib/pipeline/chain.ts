// Layer chain ids: chain_id(L1) = sha256(identity1); chain_id(Ln) = sha256(chain_id(Ln-1) + " " +
// identity_n), identity = diffId ?? blob digest — the OCI ChainID rule, so two images that share the
// first k layers share the first k devices.
import { createHash } from "node:crypto";

export function identityOf(l: { diffId: string | null; digest: string }): string {
  return l.diffId ?? l.digest;
}

export function chainIds(layers: { diffId: string | null; digest: string }[]): string[] {
  const out: string[] = [];
  let parent: string | null = null;
  for (const l of layers) {
    const id = identityOf(l);
    const c: string = parent === null ? id : `sha256:${createHash("sha256").update(`${parent} ${id}`).digest("hex")}`;
    out.push(c);
    parent = c;
  }
  return out;
}
