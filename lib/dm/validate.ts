// Names and ids are checked before they reach any command: a dm name ends up in /dev/mapper and in
// pool messages, so anything outside a small safe alphabet is refused outright.
import { ThinimgError } from "../errors.ts";

const DM_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,126}$/;
export const MAX_THIN_ID = 2 ** 24 - 1; // dm-thin device ids are 24-bit

export function assertDmName(name: string, what = "device name"): string {
  if (typeof name !== "string" || !DM_NAME.test(name) || name === "." || name === "..") {
    throw new ThinimgError("usage", `invalid ${what} ${JSON.stringify(name)}`, {
      hint: "use 1-127 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit",
    });
  }
  return name;
}

export function assertThinId(id: number): number {
  if (!Number.isSafeInteger(id) || id < 0 || id > MAX_THIN_ID) {
    throw new ThinimgError("usage", `invalid thin device id ${id}`, { hint: `use an integer 0..${MAX_THIN_ID}` });
  }
  return id;
}

/** Absolute device or file path with no control characters or `..` components. */
export function assertDevPath(p: string): string {
  if (typeof p !== "string" || !p.startsWith("/") || /[\0-\x1f]/.test(p) || p.split("/").includes("..")) {
    throw new ThinimgError("usage", `invalid device path ${JSON.stringify(p)}`, { hint: "use an absolute path" });
  }
  return p;
}

/** Non-negative integer for transaction ids, sector counts and the like. */
export function assertUint(n: number, what: string): number {
  if (!Number.isSafeInteger(n) || n < 0) throw new ThinimgError("usage", `invalid ${what} ${n}`);
  return n;
}
