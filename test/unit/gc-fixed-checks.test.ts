// GC's fixed cost: the commands a --force run spends before and around its deletes. The metadata scan
// takes the pool's table from the device scan and reads the status once before reserving (it is also
// what the hold check looked at); act's first bare delete goes on that status instead of reading
// another, while a device orphan, or a status older than the check interval, still gets its own.
import { afterEach, describe, expect, test } from "bun:test";
import { type RunOptions, setRunner, spawnRunner } from "../../lib/exec.ts";
import { act } from "../../lib/gc/act.ts";
import { scanMeta } from "../../lib/gc/scan-meta.ts";
import { orphan } from "../helpers/gc.ts";
import { cmdResult } from "../helpers/run.ts";

afterEach(() => setRunner(spawnRunner));

const POOL = "tp";
const TABLE = "0 524288 thin-pool /dev/loop0 /dev/loop1 128 64 1 error_if_no_space";
const status = (held = "-", mode = "rw") => `0 524288 thin-pool 5 420/4096 100/4096 ${held} ${mode} no_discard_passdown error_if_no_space - 1024`;

/** A pool answering status/table/messages/thin_ls; returns the commands sent, udev flags dropped. */
function fakePool(mode = "rw") {
  const sent: string[] = [];
  let held = "-";
  setRunner(async (argv: string[], _o?: RunOptions) => {
    const a = argv.filter((x) => !x.startsWith("--noudev"));
    const cmd = a[0] === "dmsetup" ? (a[1] === "message" ? `message ${a[4]}` : a[1]!) : a[0]!;
    sent.push(cmd);
    if (cmd === "status") return cmdResult(argv, { stdout: status(held, mode) });
    if (cmd === "table") return cmdResult(argv, { stdout: TABLE });
    if (cmd === "message reserve_metadata_snap") held = "42";
    if (cmd === "message release_metadata_snap") held = "-";
    if (cmd === "thin_ls") return cmdResult(argv, { stdout: "1 2\n7 2\n" });
    return cmdResult(argv, {});
  });
  return sent;
}

describe("scanMeta", () => {
  test("with the device scan's pool table: no table read, one status before the reserve; the scan says when it read it", async () => {
    const sent = fakePool();
    const t0 = performance.now();
    const m = await scanMeta(POOL, { releaseStale: false, poolTable: TABLE });
    expect(m.status).toBe("ok");
    expect([...m.ids.keys()]).toEqual([1, 7]);
    expect(sent).toEqual(["status", "message reserve_metadata_snap", "status", "thin_ls", "status", "message release_metadata_snap"]);
    expect(m.statusAt).toBeGreaterThanOrEqual(t0);
    // without it, the table is read first
    const again = fakePool();
    await scanMeta(POOL, { releaseStale: false });
    expect(again[0]).toBe("table");
  });

  test("a pool not in rw mode: skipped, and no status time to act on", async () => {
    fakePool("ro");
    const m = await scanMeta(POOL, { releaseStale: false, poolTable: TABLE });
    expect(m.skipped?.reason).toBe("pool_not_rw");
    expect(m.statusAt).toBeUndefined();
  });
});

describe("act's first pool check", () => {
  test("a fresh status from the scan is the first check for bare deletes", async () => {
    const sent = fakePool();
    await act([orphan(1), orphan(2)], { pool: POOL, poolCheckedAt: performance.now() });
    expect(sent).toEqual(["message delete 1", "message delete 2"]);
  });

  test("no status from the scan, or one older than the interval: read first", async () => {
    let sent = fakePool();
    await act([orphan(1)], { pool: POOL });
    expect(sent).toEqual(["status", "message delete 1"]);
    sent = fakePool();
    await act([orphan(1)], { pool: POOL, poolCheckedAt: performance.now() - 5_000 });
    expect(sent).toEqual(["status", "message delete 1"]);
  });

  test("checks before every orphan (poolCheckEveryMs 0): a status from the scan skips none; a pool that left rw stops the run", async () => {
    const sent = fakePool("ro");
    const r = await act([orphan(1), orphan(2)], { pool: POOL, poolCheckedAt: performance.now(), poolCheckEveryMs: 0 });
    expect(r.stopped?.reason).toBe("pool_not_rw");
    expect(sent).toEqual(["status"]);
  });
});
