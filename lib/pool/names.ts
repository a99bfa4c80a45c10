// Device names and mount points. Every device thinimg creates is `<prefix>-<pool>-layer-<id>` or
// `<prefix>-<pool>-snap-<id>`; anything else is never touched. Names are validated before use.
import { join } from "node:path";
import { assertDmName, assertThinId } from "../dm/validate.ts";
import { quoted, ThinimgError } from "../errors.ts";

export type DeviceKind = "layer" | "snap";

export function deviceName(prefix: string, pool: string, kind: DeviceKind, thinId: number): string {
  assertThinId(thinId);
  return assertDmName(`${prefix}-${pool}-${kind}-${thinId}`);
}

/** Parse one of our device names back; null when it is not ours (other prefix, other pool). */
export function parseDeviceName(prefix: string, pool: string, name: string): { kind: DeviceKind; thinId: number } | null {
  const head = `${prefix}-${pool}-`;
  if (!name.startsWith(head)) return null;
  const m = /^(layer|snap)-(0|[1-9]\d{0,7})$/.exec(name.slice(head.length));
  if (!m) return null;
  const thinId = Number(m[2]);
  if (thinId > 2 ** 24 - 1) return null;
  return { kind: m[1] as DeviceKind, thinId };
}

/** Where a layer device is mounted while its layer is applied. */
export function mountPathFor(mountDir: string, name: string): string {
  return join(mountDir, assertDmName(name));
}

/** Image names: what --name accepts (also used as lock keys and in messages). */
export function assertImageName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$/.test(name)) {
    throw new ThinimgError("usage", `invalid image name ${quoted(name)}`, {
      hint: "use up to 255 characters from A-Z a-z 0-9 . _ : / @ + - starting with a letter or digit",
    });
  }
  return name;
}
