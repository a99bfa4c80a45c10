// Layer chain ids: chain_id(L1) = sha256(identity1); chain_id(Ln) = sha256(chain_id(Ln-1) + " " +
// identity_n), identity = diffId ?? blob digest — the OCI ChainID rule, so two images that share the
// first k layers share the first k devices.
import { sha256Hex } from "../image/digest.ts";

export function identityOf(l: { diffId: string | null; digest: string }): string {
  return l.diffId ?? l.digest;
}

/** The chain id of a layer on top of `parent` (null: a base layer). */
export function chainIdOf(parent: string | null, identity: string): string {
  return parent === null ? identity : `sha256:${sha256Hex(`${parent} ${identity}`)}`;
}

export function chainIds(layers: { diffId: string | null; digest: string }[]): string[] {
  const out: string[] = [];
  let parent: string | null = null;
  for (const l of layers) {
    const c = chainIdOf(parent, identityOf(l));
    out.push(c);
    parent = c;
  }
  return out;
}

// A layer whose digest is learnt only by the read that applies it is built under a provisional chain
// id, named by what identifies its bytes without reading them (lib/image LazyDigest.key) on top of
// its parent: a re-run after a crash finds the same row and resumes it. The commit replaces it with
// the real chain id in the same transaction that commits the layer; a committed layer never has one.
const PROVISIONAL = "pending:";

export function provisionalChainId(parent: string | null, key: string): string {
  return `${PROVISIONAL}${sha256Hex(`${parent ?? ""} ${key}`)}`;
}

export const isProvisionalChainId = (chainId: string) => chainId.startsWith(PROVISIONAL);
