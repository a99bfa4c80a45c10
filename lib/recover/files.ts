// The pool's two backing files must be there with the recorded sizes. Only an interrupted --create
// (record state "creating") may make them, or size the empty ones it left; a pool that was in use
// never gets a file recreated.
import { type Stats, statSync } from "node:fs";
import { join } from "node:path";
import { assertFreeSpace, makeBackingFile, sizeEmptyBackingFile } from "../dm/loop-pool.ts";
import { ThinimgError } from "../errors.ts";
import { formatBytes } from "../util/units.ts";
import type { PoolRecord } from "./record.ts";
import type { RecoverRun } from "./run.ts";
import { sizeFileShell } from "./runbook.ts";

type Role = "metadata" | "data";

/** Size of the file at p; 0 when it is absent too (both mean "still to be made"). */
function fileSize(p: string): number {
  try {
    return statSync(p).size;
  } catch {
    return 0;
  }
}

/** An interrupted --create: the files still to make (or size) must fit, all of them, up front. */
function assertRoomForMissing(r: RecoverRun, rec: PoolRecord): void {
  const todo = (
    [
      [rec.meta_file, rec.meta_size],
      [rec.data_file, rec.data_size],
    ] as const
  ).filter(([f]) => fileSize(join(r.dir, f)) === 0);
  if (todo.length === 0) return;
  assertFreeSpace(
    r.dir,
    todo.reduce((n, [, size]) => n + size, 0),
    todo.map(([f]) => f).join(" and "),
  );
}

/** Give file p its size (fallocate, or truncate where unsupported) as a runbook step. */
async function sizeStep(r: RecoverRun, step: string, detail: string, p: string, size: number, make: () => Promise<"fallocate" | "truncate">): Promise<void> {
  const argv = ["fallocate", "-l", String(size), p];
  await r.rb.act(step, detail, { argv, shell: sizeFileShell(size, p), planned: undefined, done: (how) => `${p}: ${formatBytes(size)} via ${how}` }, make);
}

/** One backing file: absent → made (creating only); empty → sized (creating only); else as recorded. */
async function ensureFile(r: RecoverRun, rec: PoolRecord, role: Role, file: string, size: number): Promise<void> {
  const creating = rec.state === "creating";
  const p = join(r.dir, file);
  let st: Stats | null = null;
  try {
    st = statSync(p);
  } catch {}
  if (!st) {
    if (!creating) {
      throw new ThinimgError("missing", `${role} backing file ${p} is missing (pool ${rec.pool})`, {
        hint: "restore it (mount the filesystem that holds it, or from a backup); recover-pool never recreates the files of a pool that was in use",
      });
    }
    const detail = `new ${role} file ${p} (${formatBytes(size)}; fallocate, or truncate where unsupported)`;
    await sizeStep(r, "create-file", detail, p, size, () => makeBackingFile(p, size));
    return;
  }
  if (!st.isFile()) throw new ThinimgError("input", `${role} backing file ${p} is not a regular file`, { hint: "restore the file" });
  if (st.size === size) return;
  if (creating && st.size === 0) {
    // an interrupted --create: fallocate made the file but died before sizing it; it holds nothing
    const detail = `size the empty ${role} file ${p} left by an interrupted --create to ${formatBytes(size)}`;
    await sizeStep(r, "size-file", detail, p, size, () => sizeEmptyBackingFile(p, size));
    return;
  }
  throw new ThinimgError("conflict", `${role} backing file ${p} is ${st.size} bytes; the record says ${size}`, {
    hint: creating
      ? `it was left by an interrupted --create and holds no pool data: remove it (rm ${p}) and re-run`
      : "it was changed outside recover-pool (resizing is not supported): restore it, or fix the record",
  });
}

export async function ensureFiles(r: RecoverRun, rec: PoolRecord): Promise<void> {
  if (rec.state === "creating") assertRoomForMissing(r, rec);
  await ensureFile(r, rec, "metadata", rec.meta_file, rec.meta_size);
  await ensureFile(r, rec, "data", rec.data_file, rec.data_size);
  r.rb.note("check-files", `${rec.meta_file} and ${rec.data_file} present with the recorded sizes`);
}
