// Layer family: a directory (or S3 prefix) of 1.tar, 2.tar, … applied in NUMERIC order (10.tar after
// 9.tar). Operator rules: numbering starts at 1 (0 is accepted too) with no gaps or duplicates — a
// gap is a layer that failed to upload, and guessing past it would build the wrong filesystem;
// a ".tar" that is not a number is refused for the same reason (was it meant as a layer?);
// anything else (README, checksums, hidden files, subdirectories) is ignored and logged.
import { ThinimgError } from "../../errors.ts";

export interface FamilyMember {
  /** The name as found ("10.tar"). */
  name: string;
  n: number;
}

export interface FamilyOrder {
  layers: FamilyMember[];
  ignored: string[];
}

const LAYER = /^(\d{1,9})\.tar$/;

export const MAX_FAMILY_LAYERS = 1000;

export function orderLayerFamily(names: Iterable<string>, what: string): FamilyOrder {
  const byNumber = new Map<number, string>();
  const ignored: string[] = [];
  for (const name of names) {
    const m = LAYER.exec(name);
    if (m) {
      const n = Number(m[1]);
      const dup = byNumber.get(n);
      if (dup !== undefined) {
        throw new ThinimgError("input", `${what}: ${dup} and ${name} both claim layer ${n}`, {
          hint: "keep exactly one file per layer number",
        });
      }
      byNumber.set(n, name);
    } else if (/\.tar$/i.test(name) && !name.startsWith(".")) {
      throw new ThinimgError("input", `${what}: ${JSON.stringify(name)} is not a layer name`, {
        hint: "layer files must be named 1.tar, 2.tar, … (move other .tar files out of the family)",
      });
    } else {
      ignored.push(name);
    }
  }
  if (byNumber.size === 0) {
    throw new ThinimgError("input", `${what}: no layers (expected 1.tar, 2.tar, …)`, {
      hint: "point at a directory or S3 prefix holding numbered layer tars",
    });
  }
  if (byNumber.size > MAX_FAMILY_LAYERS) {
    throw new ThinimgError("policy", `${what}: ${byNumber.size} layers (limit ${MAX_FAMILY_LAYERS})`);
  }
  const numbers = [...byNumber.keys()].sort((a, b) => a - b);
  const first = numbers[0]!;
  if (first > 1) {
    throw new ThinimgError("input", `${what}: layer 1.tar is missing (first is ${byNumber.get(first)})`, {
      hint: "layers must be numbered 1, 2, 3, … without gaps; upload the missing layer",
    });
  }
  for (let i = 1; i < numbers.length; i++) {
    if (numbers[i] !== numbers[i - 1]! + 1) {
      throw new ThinimgError(
        "input",
        `${what}: layer ${numbers[i - 1]! + 1}.tar is missing (found ${byNumber.get(numbers[i - 1]!)} then ${byNumber.get(numbers[i]!)})`,
        { hint: "layers must be numbered 1, 2, 3, … without gaps; upload the missing layer" },
      );
    }
  }
  return { layers: numbers.map((n) => ({ n, name: byNumber.get(n)! })), ignored };
}
