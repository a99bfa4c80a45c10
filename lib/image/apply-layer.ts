// Apply one resolved layer (a LayerRef) into a directory: the one choice between the two readers,
// shared by extract and the layer build.
import { type ApplyOptions, type ApplyStats, applyLayer, applyLayerFile } from "./apply/index.ts";
import type { LayerRef } from "./types.ts";

/**
 * A local plain tar is read directly (applyLayerFile: the same size and digest checks in one pass,
 * with reused buffers — less CPU than a stream); anything else through `open()`. A digest not
 * known before (a lazy layer) is the sha256 of the bytes applied and is handed back to the ref.
 */
export async function applyLayerRef(layer: LayerRef, root: string, opts: ApplyOptions & { maxBytes?: number }): Promise<ApplyStats> {
  const { maxBytes, ...applyOpts } = opts;
  const lazy = layer.settleDigest !== undefined;
  if (layer.file !== undefined && (lazy || layer.diffId === null || layer.diffId === layer.digest)) {
    const what = `layer ${opts.layerLabel ?? layer.label}`;
    const got = await applyLayerFile({ path: layer.file, digest: lazy ? null : layer.digest, size: layer.size, what }, root, applyOpts);
    layer.settleDigest?.(got.digest);
    return got;
  }
  return applyLayer(await layer.open(maxBytes === undefined ? undefined : { maxBytes }), root, applyOpts);
}
