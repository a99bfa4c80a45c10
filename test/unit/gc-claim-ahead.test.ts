// Claims taken ahead (lib/gc/claim-ahead.ts): which orphans are claimed together, that each delete is
// still sent only after its intent is on record, that a run stopping mid-batch undoes the claims whose
// delete was never sent, and storeLedger's claimMany against a real SQLite file.
import { afterEach, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type RunOptions, setRunner, spawnRunner } from "../../lib/exec.ts";
import { act, type GcLedger } from "../../lib/gc/act.ts";
import { bareDelete, CLAIM_AHEAD, claimRun } from "../../lib/gc/claim-ahead.ts";
import { storeLedger } from "../../lib/gc/ledger.ts";
import type { Orphan } from "../../lib/gc/model.ts";
import { queueFile } from "../../lib/lock/host-queue.ts";
import { openDb } from "../../lib/store/db.ts";
import { actionWitness, readGcRows } from "../../lib/store/gc-queries.ts";
import { getThinId, recordOrphanThinId } from "../../lib/store/thin-ids.ts";
import { readFlockRecord } from "../../lib/util/flock.ts";
import { orphan } from "../helpers/gc.ts";
import { cmdResult } from "../helpers/run.ts";

afterEach(() => setRunner(spawnRunner));

const POOL = "tp";
const bare = (thinId: number, o: Partial<Orphan> = {}) => orphan(thinId, null, o);

describe("claimRun", () => {
  test("the run of bare deletes from i on, at most max; a device, a mount or a layer the claim rewrites ends it", () => {
    const as = [
      bare(1),
      bare(2),
      bare(3, { device: "thinimg-tp-snap-3" }),
      bare(4),
      bare(5, { unmount: ["/m"] }),
      bare(6, { reason: "unreferenced_layer" }),
      bare(7, { reason: "interrupted_build" }),
      bare(8, { deleteThin: false }),
    ];
    expect(as.map(bareDelete)).toEqual([true, true, false, true, false, false, false, false]);
    expect(claimRun(as, 0).map((a) => a.thinId)).toEqual([1, 2]);
    expect(claimRun(as, 2)).toEqual([]);
    expect(claimRun(as, 3).map((a) => a.thinId)).toEqual([4]);
    const many = Array.from({ length: CLAIM_AHEAD + 5 }, (_, i) => bare(i + 1));
    expect(claimRun(many, 0)).toHaveLength(CLAIM_AHEAD);
    expect(claimRun(many, CLAIM_AHEAD).map((a) => a.thinId)).toEqual([1, 2, 3, 4, 5].map((k) => CLAIM_AHEAD + k));
    expect(claimRun(many, 0, 3).map((a) => a.thinId)).toEqual([1, 2, 3]);
  });
});

/** A ledger that records, in order with the commands sent, what it was asked. */
function recLedger(refuse: Set<number> = new Set()) {
  const ev: string[] = [];
  const verdict = (a: Orphan) => (refuse.has(a.thinId!) ? "rows changed" : null);
  const l: GcLedger = {
    claim: (a) => {
      ev.push(`claim ${a.thinId}`);
      return verdict(a);
    },
    claimMany: (as) => {
      ev.push(`claim ${as.map((a) => a.thinId).join(",")}`);
      return as.map(verdict);
    },
    mountUnmounted: () => {},
    deviceRemoved: () => {},
    thinDeleted: (id) => ev.push(`deleted ${id}`),
    thinDeleteAborted: (id) => ev.push(`aborted ${id}`),
  };
  return { ev, l };
}

/** Pool status rw; `delete N` succeeds unless N times out. */
function fakePool(ev: string[], timeoutAt: number | null = null) {
  setRunner(async (argv: string[], _o?: RunOptions) => {
    const a = argv.filter((x) => !x.startsWith("--noudev"));
    if (a[1] === "status") return cmdResult(argv, { stdout: "0 524288 thin-pool 5 420/4096 100/4096 - rw no_discard_passdown error_if_no_space - 1024" });
    if (a[1] === "message") {
      const id = Number(a[4]!.split(" ")[1]);
      ev.push(`send delete ${id}`);
      return id === timeoutAt ? cmdResult(argv, { exitCode: null, timedOut: true }) : cmdResult(argv, {});
    }
    throw new Error(`unexpected command ${argv.join(" ")}`);
  });
}

describe("act with claims taken ahead", () => {
  test("bare deletes are claimed CLAIM_AHEAD at a time, each intent before its delete", async () => {
    const { ev, l } = recLedger();
    fakePool(ev);
    const as = Array.from({ length: CLAIM_AHEAD + 2 }, (_, i) => bare(i + 1));
    const r = await act([...as, bare(99, { device: null, reason: "unreferenced_layer" })], { pool: POOL, ledger: l });
    expect(r.results.every((x) => x.outcome === "done")).toBe(true);
    const first = Array.from({ length: CLAIM_AHEAD }, (_, i) => i + 1).join(",");
    expect(ev[0]).toBe(`claim ${first}`);
    expect(ev).toContain(`claim ${CLAIM_AHEAD + 1},${CLAIM_AHEAD + 2}`);
    expect(ev).toContain("claim 99"); // its claim rewrites a layer row: claimed alone, just before its delete
    for (const id of [...as.map((a) => a.thinId!), 99]) {
      const claimedAt = ev.findIndex((e) => e.startsWith("claim ") && e.slice(6).split(",").includes(String(id)));
      expect(claimedAt).toBeGreaterThanOrEqual(0);
      expect(ev.indexOf(`send delete ${id}`)).toBeGreaterThan(claimedAt);
    }
    expect(ev.indexOf("claim 99")).toBeGreaterThan(ev.indexOf(`send delete ${CLAIM_AHEAD + 2}`));
  });

  test("a refused claim in a batch skips only that orphan", async () => {
    const { ev, l } = recLedger(new Set([2]));
    fakePool(ev);
    const r = await act([bare(1), bare(2), bare(3)], { pool: POOL, ledger: l });
    expect(r.results.map((x) => x.outcome)).toEqual(["done", "skipped", "done"]);
    expect(ev.filter((e) => e.startsWith("send"))).toEqual(["send delete 1", "send delete 3"]);
    expect(ev).not.toContain("aborted 2"); // never claimed: nothing to undo
  });

  test("a run that stops mid-batch undoes the claims whose delete was never sent", async () => {
    const { ev, l } = recLedger();
    fakePool(ev, 3);
    const as = Array.from({ length: CLAIM_AHEAD + 2 }, (_, i) => bare(i + 1));
    const r = await act(as, { pool: POOL, ledger: l });
    expect(r.stopped?.reason).toBe("timeout");
    expect(r.results.map((x) => x.outcome).slice(0, 4)).toEqual(["done", "done", "failed", "not_run"]);
    expect(ev.filter((e) => e.startsWith("send"))).toEqual(["send delete 1", "send delete 2", "send delete 3"]);
    // 3 timed out: its intent stays (the delete may still land); 4..CLAIM_AHEAD were claimed ahead and undone
    expect(ev).not.toContain("aborted 3");
    for (let id = 4; id <= CLAIM_AHEAD; id++) expect(ev).toContain(`aborted ${id}`);
    // the ones after the batch were never claimed
    expect(ev.some((e) => e.startsWith("claim ") && e.includes(String(CLAIM_AHEAD + 1)))).toBe(false);
    expect(ev).not.toContain(`aborted ${CLAIM_AHEAD + 1}`);
  });
});

describe("a run of bare deletes holds the host dm queue across its deletes", () => {
  /** Each delete sent, with who held the host queue (the lock file's record) while it ran. */
  function queueWitness(ticketAfter: number | null = null) {
    // ino: a release removes the lock file, so a new inode means the queue was let go in between
    const sent: { id: number; holder: string; ino: number; intentOnDisk: boolean | undefined }[] = [];
    setRunner(async (argv: string[], o?: RunOptions) => {
      const a = argv.filter((x) => !x.startsWith("--noudev"));
      if (a[1] === "status") return cmdResult(argv, { stdout: "0 524288 thin-pool 5 420/4096 100/4096 - rw no_discard_passdown error_if_no_space - 1024" });
      const id = Number(a[4]!.split(" ")[1]);
      const holder = String(JSON.parse(readFlockRecord(queueFile()) ?? "{}").command);
      sent.push({ id, holder, ino: statSync(queueFile()).ino, intentOnDisk: o?.intentOnDisk });
      // another process starts waiting: its ticket in the waiting room
      if (id === ticketAfter) writeFileSync(`${queueFile()}.waiting/000000000000001-999999-0`, "");
      return cmdResult(argv, {});
    });
    return sent;
  }
  afterEach(() => rmSync(`${queueFile()}.waiting/000000000000001-999999-0`, { force: true }));

  test("one hold for a batch (its label, not each delete's, in the lock file); the before-records rely on the durable claims", async () => {
    const sent = queueWitness();
    const { l } = recLedger();
    const as = Array.from({ length: CLAIM_AHEAD + 1 }, (_, i) => bare(i + 1));
    const r = await act(as, { pool: POOL, ledger: { ...l, intentsDurable: true } });
    expect(r.results.every((x) => x.outcome === "done")).toBe(true);
    expect(sent.map((s) => s.id)).toEqual(as.map((a) => a.thinId!));
    // the first CLAIM_AHEAD under one batch hold; the last one alone takes the queue for itself
    for (const s of sent.slice(0, CLAIM_AHEAD)) expect(s.holder).toBe(`gc --force: delete thin ids in pool ${POOL}`);
    expect(new Set(sent.slice(0, CLAIM_AHEAD).map((s) => s.ino)).size).toBe(1);
    expect(sent.at(-1)!.holder).toContain(`message ${POOL} 0 delete ${CLAIM_AHEAD + 1}`);
    expect(sent.every((s) => s.intentOnDisk === true)).toBe(true);
  });

  test("a waiter from another process gets the queue after the delete running when it came; without durable claims the before-records are fsync'd", async () => {
    const sent = queueWitness(2);
    const { l } = recLedger();
    const as = Array.from({ length: 5 }, (_, i) => bare(i + 1));
    const r = await act(as, { pool: POOL, ledger: l });
    expect(r.results.every((x) => x.outcome === "done")).toBe(true);
    // 1 and 2 under one hold; the ticket appeared during 2, so the hold ends there and 3 waits its turn
    // behind the ticket (a dead pid's here: removed, and the queue is taken again)
    expect(sent[0]!.ino).toBe(sent[1]!.ino);
    expect(sent[2]!.ino).not.toBe(sent[1]!.ino);
    expect(existsSync(`${queueFile()}.waiting/000000000000001-999999-0`)).toBe(false);
    expect(sent.every((s) => !s.intentOnDisk)).toBe(true);
  });
});

describe("storeLedger.claimMany (real SQLite)", () => {
  test("one transaction: each claimed from fresh rows; a changed one is refused, the rest marked deleting", () => {
    const dir = mkdtempSync(join(tmpdir(), "thinimg-gc-claim-ahead-"));
    const db = openDb(join(dir, "state.db"));
    try {
      recordOrphanThinId(db, POOL, 11, "released");
      const rows = readGcRows(db, POOL);
      const as = [11, 12, 13].map((id) => bare(id, { witness: actionWitness(rows, id, null) }));
      // 13 appears in the ledger after the scan: its rows changed
      recordOrphanThinId(db, POOL, 13, "someone else's");
      const led = storeLedger(db, POOL, { alive: () => false });
      const v = led.claimMany!(as);
      expect(v[0]).toBeNull();
      expect(v[1]).toBeNull();
      expect(v[2]).toContain("changed since the scan");
      expect([11, 12, 13].map((id) => getThinId(db, POOL, id)?.state)).toEqual(["deleting", "deleting", "orphaned"]);
      led.thinDeleteAborted(12, "not run: timeout");
      expect(getThinId(db, POOL, 12)?.state).toBe("orphaned"); // unknown before the claim: back to an orphan
      expect(getThinId(db, POOL, 11)?.state).toBe("deleting");
    } finally {
      db.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
