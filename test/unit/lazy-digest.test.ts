// Lazy digests and the digest index: a local layer is hashed by the read that applies it (not before),
// what names its bytes without reading them (device, inode, size, mtime) remembers its digest, and a
// changed identity or stale record never passes off other bytes as the remembered ones.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadConfig } from "../../lib/config.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { BlobCache } from "../../lib/image/cache.ts";
import { fileIdentity, resolveImage } from "../../lib/image/resolve.ts";
import type { LayerRef } from "../../lib/image/types.ts";
import { chainIdOf, isProvisionalChainId, provisionalChainId } from "../../lib/pipeline/chain.ts";
import { chainFor } from "../../lib/pipeline/unpack.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { insertLayer, type LayerRow, updateLayer } from "../../lib/store/layers.ts";
import { sampleLayer, sha256, writeLayerFamily } from "../helpers/images.ts";

const root = mkdtempSync("/tmp/thinimg-lazy-digest-test-");
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const fresh = (name: string) => join(root, `${++n}-${name}`);
const drain = async (l: LayerRef) => Buffer.from(await new Response(await l.open()).arrayBuffer());

describe("lazy digests", () => {
  test("a layer not in the digest index is hashed by its read, then remembered", async () => {
    const dir = fresh("family");
    const stateDir = fresh("state");
    const layers = [sampleLayer(1), sampleLayer(2)];
    writeLayerFamily(dir, layers);
    const img = await resolveImage(dir, { stateDir, lazyDigests: true });
    const [a, b] = img.layers as [LayerRef, LayerRef];
    expect(a.lazy?.known()).toBeNull();
    expect(() => a.digest).toThrow("digest read before the layer was hashed");
    expect(a.lazy!.key).toBe(fileIdentity(join(dir, "1.tar")).key);
    expect((await drain(a)).equals(layers[0]!)).toBe(true);
    expect(a.digest).toBe(sha256(layers[0]!));
    expect(a.diffId).toBe(sha256(layers[0]!)); // uncompressed: the digest is the diff_id
    expect(await b.lazy!.hash()).toBe(sha256(layers[1]!));
    // a second resolve takes both from the index: nothing to hash any more
    const again = await resolveImage(dir, { stateDir, lazyDigests: true });
    expect(again.layers.map((l) => [l.lazy?.known(), l.digest])).toEqual([
      [sha256(layers[0]!), sha256(layers[0]!)],
      [sha256(layers[1]!), sha256(layers[1]!)],
    ]);
  });

  test("an index hit is used without reading the file; a stale one fails the read and is forgotten", async () => {
    const dir = fresh("family");
    const stateDir = fresh("state");
    writeLayerFamily(dir, [sampleLayer(3)]);
    const p = join(dir, "1.tar");
    const bogus = sha256("not these bytes");
    // a record for this very identity: the resolve must take it as is (it did not hash the file)
    new BlobCache(stateDir).recordDigest(fileIdentity(p).key, bogus, 1);
    const img = await resolveImage(dir, { stateDir, lazyDigests: false });
    expect(img.layers[0]!.digest).toBe(bogus);
    const e = await drain(img.layers[0]!).then(
      () => null,
      (x: unknown) => x,
    );
    expect(e).toBeInstanceOf(ThinimgError);
    expect((e as Error).message).toContain("digest mismatch");
    expect(new BlobCache(stateDir).lookupDigest(fileIdentity(p).key)).toBeNull();
    // hashed again (not lazily): the real digest, remembered
    const fixed = await resolveImage(dir, { stateDir });
    expect(fixed.layers[0]!.digest).toBe(sha256(sampleLayer(3)));
    expect(new BlobCache(stateDir).lookupDigest(fileIdentity(p).key)?.digest).toBe(sha256(sampleLayer(3)));
  });

  test("a changed file (same size, new mtime) is a new identity: hashed again, never the old digest", async () => {
    const dir = fresh("family");
    const stateDir = fresh("state");
    writeLayerFamily(dir, [sampleLayer(4)]);
    const p = join(dir, "1.tar");
    const before = await resolveImage(dir, { stateDir });
    expect(before.layers[0]!.digest).toBe(sha256(sampleLayer(4)));
    const other = sampleLayer(5); // same length, other bytes
    expect(other.length).toBe(sampleLayer(4).length);
    writeFileSync(p, other);
    utimesSync(p, new Date(), new Date(Date.now() + 5_000));
    const after = await resolveImage(dir, { stateDir, lazyDigests: true });
    expect(after.layers[0]!.lazy?.known()).toBeNull();
    await drain(after.layers[0]!);
    expect(after.layers[0]!.digest).toBe(sha256(other));
  });
});

describe("provisional chain ids", () => {
  test("named by the parent and the bytes' identity; never mistaken for a real chain id", () => {
    const a = provisionalChainId(null, "file:1:2:3:4");
    expect(isProvisionalChainId(a)).toBe(true);
    expect(provisionalChainId(null, "file:1:2:3:4")).toBe(a);
    expect(provisionalChainId("sha256:00", "file:1:2:3:4")).not.toBe(a);
    expect(isProvisionalChainId(chainIdOf(null, sha256("x")))).toBe(false);
    expect(isProvisionalChainId(chainIdOf(sha256("x"), sha256("y")))).toBe(false);
  });
});

describe("which chain id a layer gets before it is built (real SQLite, no kernel)", () => {
  const setup = async (tag: string) => {
    const dir = fresh(`fam-${tag}`);
    const stateDir = fresh(`state-${tag}`);
    writeLayerFamily(dir, [sampleLayer(10), sampleLayer(11)]);
    const ctx = makeCtx(loadConfig({ stateDir, pool: "lazypool" }, {}), { command: "lazy-digest.test" });
    const img = await resolveImage(dir, { stateDir, lazyDigests: true });
    const row = (chainId: string, digest: string, size: number, parent: LayerRow | null = null) =>
      insertLayer(ctx.db, {
        pool: "lazypool",
        chainId,
        parentId: parent?.id ?? null,
        parentChainId: parent?.chain_id ?? null,
        identity: digest,
        diffId: null,
        digest,
        size,
        virtualSize: 1024 ** 3,
      });
    return { ctx, img, row };
  };

  test("no layer row of the same blob size: not hashed, a provisional chain id", async () => {
    const { ctx, img, row } = await setup("a");
    row(sha256("elsewhere"), sha256("elsewhere"), 12345);
    const l = img.layers[0]!;
    const c = await chainFor(ctx, null, l);
    expect(c).toBe(provisionalChainId(null, l.lazy!.key));
    expect(l.lazy!.known()).toBeNull(); // not read
    ctx.db.close();
  });

  test("a row of the same size could match: hashed first, the real chain id (a committed copy is found)", async () => {
    const { ctx, img, row } = await setup("b");
    const l = img.layers[0]!;
    const real = sha256(sampleLayer(10));
    row(real, real, l.size);
    expect(await chainFor(ctx, null, l)).toBe(real);
    expect(l.lazy!.known()).toBe(real);
    ctx.db.close();
  });

  test("an interrupted provisional build of the same bytes resumes, even once their digest is remembered", async () => {
    const { ctx, img, row } = await setup("c");
    const l = img.layers[0]!;
    const provisional = provisionalChainId(null, l.lazy!.key);
    row(provisional, provisional, l.size);
    expect(await chainFor(ctx, null, l)).toBe(provisional);
    await l.lazy!.hash(); // remembered now
    expect(await chainFor(ctx, null, l)).toBe(provisional);
    ctx.db.close();
  });

  test("a provisional build that learnt its digest, built meanwhile under the real chain id: the real one", async () => {
    const { ctx, img, row } = await setup("d");
    const l = img.layers[0]!;
    const real = sha256(sampleLayer(10));
    const provisional = provisionalChainId(null, l.lazy!.key);
    const p = row(provisional, provisional, l.size);
    updateLayer(ctx.db, p.id, { digest: real, diff_id: real });
    row(real, real, l.size);
    expect(await chainFor(ctx, null, l)).toBe(real);
    ctx.db.close();
  });
});
