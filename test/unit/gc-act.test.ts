// GC's act phase against a fake command runner: the decisions (stop when the pool leaves rw, busy =
// skip, "no data" = already gone, timeout = stop, ledger order, per-step timeouts, never --force).
// The same behaviours run against the real kernel in test/vm/gc.test.ts.
import { afterEach, describe, expect, test } from "bun:test";
import { type CmdResult, type RunOptions, setRunner, spawnRunner } from "../../lib/exec.ts";
import { act, checkInterval, type GcLedger } from "../../lib/gc/act.ts";
import { buildReport, commandsFor, formatHuman } from "../../lib/gc/report.ts";
import { orphan } from "../helpers/gc.ts";
import { cmdResult } from "../helpers/run.ts";

afterEach(() => setRunner(spawnRunner));

const POOL = "tp";
const ok = (argv: string[], stdout = ""): CmdResult => cmdResult(argv, { stdout });
const fail = (argv: string[], stderr: string, timedOut = false): CmdResult => cmdResult(argv, { stderr, exitCode: timedOut ? null : 1, timedOut });
const status = (mode: string) => `0 524288 thin-pool 5 420/4096 100/4096 - ${mode} no_discard_passdown error_if_no_space - 1024`;

interface Sim {
  mode: string[]; // successive pool modes returned by status
  info?: Record<string, string | string[]>; // name → info line (a list: successive calls)
  remove?: Record<string, "ok" | "busy" | "gone" | "timeout">;
  del?: Record<number, "ok" | "busy" | "gone" | "nodev">;
  table?: Record<string, string>; // name → live table
  umount?: Record<string, "ok" | "busy">;
}

function fake(sim: Sim) {
  const calls: { argv: string[]; timeoutMs: number | undefined }[] = [];
  let st = 0;
  setRunner(async (argv: string[], opts?: RunOptions) => {
    calls.push({ argv, timeoutMs: opts?.timeoutMs });
    const a = argv.filter((x) => !x.startsWith("--noudev"));
    if (a[0] === "umount") {
      return sim.umount?.[a[1]!] === "busy" ? fail(argv, `umount: ${a[1]}: target is busy.`) : ok(argv);
    }
    const sub = a[1];
    if (sub === "status") return ok(argv, status(sim.mode[Math.min(st++, sim.mode.length - 1)]!));
    if (sub === "info") {
      const name = a.at(-1)!;
      const v = sim.info?.[name];
      const line = Array.isArray(v) ? (v.length > 1 ? v.shift() : v[0]) : v;
      return line ? ok(argv, line) : fail(argv, `Device ${name} does not exist.\nCommand failed.`);
    }
    if (sub === "table") {
      const name = a.at(-1)!;
      return ok(argv, sim.table?.[name] ?? "");
    }
    if (sub === "remove") {
      const r = sim.remove?.[a[2]!] ?? "ok";
      if (r === "busy") return fail(argv, `device-mapper: remove ioctl on ${a[2]}  failed: Device or resource busy\nCommand failed.`);
      if (r === "gone") return fail(argv, `device-mapper: remove ioctl on ${a[2]}  failed: No such device or address`);
      if (r === "timeout") return fail(argv, "", true);
      return ok(argv);
    }
    if (sub === "message") {
      const id = Number(a[4]!.split(" ")[1]);
      const r = sim.del?.[id] ?? "ok";
      if (r === "busy") return fail(argv, `device-mapper: message ioctl on ${POOL}  failed: Device or resource busy\nCommand failed.`);
      if (r === "gone") return fail(argv, `device-mapper: message ioctl on ${POOL}  failed: No data available\nCommand failed.`);
      if (r === "nodev") return fail(argv, `device-mapper: message ioctl on ${POOL}  failed: No such device or address\nCommand failed.`);
      return ok(argv);
    }
    throw new Error(`unexpected command ${argv.join(" ")}`);
  });
  return calls;
}

function recLedger() {
  const ev: string[] = [];
  const l: GcLedger = {
    claim: (a) => {
      ev.push(`deleting ${a.thinId}`);
      return null;
    },
    mountUnmounted: (p) => ev.push(`unmounted ${p}`),
    deviceRemoved: (n) => ev.push(`removed ${n}`),
    thinDeleted: (id) => ev.push(`deleted ${id}`),
    thinDeleteAborted: (id) => ev.push(`aborted ${id}`),
  };
  return { ev, l };
}

const mi =
  (...entries: [string, string][]) =>
  () =>
    entries.map(([mountPoint, majorMinor], i) => ({
      mountId: i,
      majorMinor,
      root: "/",
      mountPoint,
      options: "rw",
      fstype: "ext4",
      source: "/dev/x",
      superOptions: "rw",
    }));

const info = (name: string, open = 0, attr = "L--w") => `${name}|${attr}|${open}|254|7|0|1|`;

describe("act", () => {
  test("full sequence per orphan, each step ≤ 10 s, ledger intent before the delete, never --force", async () => {
    const dev = "thinimg-tp-snap-7";
    const calls = fake({ mode: ["rw"], info: { [dev]: [info(dev, 1), info(dev, 0)] } });
    const { ev, l } = recLedger();
    const r = await act([orphan(7, dev, { unmount: ["/s/mnt/x"] }), orphan(9, null)], { pool: POOL, ledger: l, mountinfo: mi(["/s/mnt/x", "254:7"]) });
    expect(r.stopped).toBeNull();
    expect(r.results.map((x) => x.outcome)).toEqual(["done", "done"]);
    const cmds = calls.map((c) => c.argv.filter((x) => !x.startsWith("--noudev")).join(" "));
    expect(cmds.filter((c) => !c.includes(" status ") && !c.includes(" info "))).toEqual([
      "umount /s/mnt/x",
      `dmsetup remove ${dev}`,
      "dmsetup message tp 0 delete 7",
      "dmsetup message tp 0 delete 9",
    ]);
    expect(cmds.filter((c) => c.startsWith("dmsetup status")).length).toBe(1); // before the device; the bare delete right after shares it
    expect(calls.every((c) => c.timeoutMs !== undefined && c.timeoutMs <= 10_000)).toBe(true);
    expect(calls.some((c) => c.argv.includes("--force") || c.argv.includes("-f"))).toBe(false);
    // claim (intent) first, then: check (open 1 = our own mount), umount, check (open 0), remove, delete
    expect(ev).toEqual(["deleting 7", "unmounted /s/mnt/x", `removed ${dev}`, "deleted 7", "deleting 9", "deleted 9"]);
    expect(r.results[0]!.steps.map((s) => s.op)).toEqual(["claim", "check", "umount", "check", "remove", "delete"]);
  });

  test("stops as soon as the pool leaves rw: nothing more is touched", async () => {
    const calls = fake({ mode: ["rw", "ro"] });
    const r = await act([orphan(1, null), orphan(2, null), orphan(3, null)], { pool: POOL, poolCheckEveryMs: 0 });
    expect(r.stopped?.reason).toBe("pool_not_rw");
    expect(r.stopped?.detail).toContain("ro mode");
    expect(r.results.map((x) => x.outcome)).toEqual(["done", "not_run", "not_run"]);
    expect(calls.filter((c) => c.argv.includes("message")).length).toBe(1);
  });

  test("bare deletes re-check the pool at most every poolCheckEveryMs, and at once after a failed step", async () => {
    const calls = fake({ mode: ["rw", "ro"], del: { 2: "busy" } });
    const r = await act([orphan(1, null), orphan(2, null), orphan(3, null), orphan(4, null)], { pool: POOL, poolCheckEveryMs: 60_000 });
    // 1 and 2 share the first check; 2's busy delete forces a check before 3, which finds ro
    expect(r.results.map((x) => x.outcome)).toEqual(["done", "skipped", "not_run", "not_run"]);
    expect(r.stopped?.reason).toBe("pool_not_rw");
    expect(calls.filter((c) => c.argv.includes("status")).length).toBe(2);
  });

  test("the timed check between bare deletes: 200× a status call's cost, at least `every`, at most 20 s", () => {
    expect(checkInterval(5_000, 10)).toBe(5_000);
    expect(checkInterval(5_000, 90)).toBe(18_000);
    expect(checkInterval(5_000, 1_000)).toBe(20_000);
    expect(checkInterval(60_000, 1_000)).toBe(60_000);
  });

  test("a device orphan always gets a fresh pool check", async () => {
    const d = "thinimg-tp-snap-2";
    const calls = fake({ mode: ["rw", "ro"], info: { [d]: info(d) } });
    const r = await act([orphan(1, null), orphan(2, d)], { pool: POOL, poolCheckEveryMs: 60_000 });
    expect(r.results.map((x) => x.outcome)).toEqual(["done", "not_run"]);
    expect(calls.some((c) => c.argv.includes("remove"))).toBe(false);
  });

  test("out_of_data_space also stops the run before any change", async () => {
    fake({ mode: ["out_of_data_space"] });
    expect((await act([orphan(1, null)], { pool: POOL })).results[0]!.outcome).toBe("not_run");
  });

  test("'no data' / no such device mean already gone: success, ledger confirmed", async () => {
    const dev = "thinimg-tp-snap-4";
    fake({ mode: ["rw"], info: { [dev]: info(dev) }, remove: { [dev]: "gone" }, del: { 4: "gone", 5: "gone" } });
    const { ev, l } = recLedger();
    const r = await act([orphan(4, dev), orphan(5, null)], { pool: POOL, ledger: l });
    expect(r.results.map((x) => x.outcome)).toEqual(["done", "done"]);
    expect(r.results[0]!.steps.map((s) => [s.op, s.outcome])).toEqual([
      ["claim", "ok"],
      ["check", "ok"],
      ["remove", "already_gone"],
      ["delete", "already_gone"],
    ]);
    expect(ev).toContain("deleted 4");
    expect(ev).toContain("deleted 5");
  });

  test("device vanished between scan and act: no remove sent, id still deleted", async () => {
    const calls = fake({ mode: ["rw"], info: {} });
    const r = await act([orphan(4, "thinimg-tp-snap-4")], { pool: POOL });
    expect(r.results[0]!.outcome).toBe("done");
    expect(calls.some((c) => c.argv.includes("remove"))).toBe(false);
  });

  test("busy remove: skipped until the next run, the id is not deleted, the run goes on", async () => {
    const a = "thinimg-tp-snap-1";
    const b = "thinimg-tp-snap-2";
    const calls = fake({ mode: ["rw"], info: { [a]: info(a), [b]: info(b) }, remove: { [a]: "busy" } });
    const { ev, l } = recLedger();
    const r = await act([orphan(1, a), orphan(2, b)], { pool: POOL, ledger: l });
    expect(r.results.map((x) => x.outcome)).toEqual(["skipped", "done"]);
    expect(r.results[0]!.skipReason).toContain("busy");
    expect(calls.some((c) => c.argv.join(" ").includes("delete 1"))).toBe(false);
    // the intent is undone: the id was not deleted
    expect(ev).toEqual(["deleting 1", "aborted 1", "deleting 2", `removed ${b}`, "deleted 2"]);
    expect(r.stopped).toBeNull();
  });

  test("busy delete: skipped and the ledger intent is undone", async () => {
    fake({ mode: ["rw"], del: { 3: "busy" } });
    const { ev, l } = recLedger();
    const r = await act([orphan(3, null)], { pool: POOL, ledger: l });
    expect(r.results[0]!.outcome).toBe("skipped");
    expect(ev).toEqual(["deleting 3", "aborted 3"]);
  });

  test("became open or suspended since the scan: changed, skipped, nothing sent", async () => {
    const a = "thinimg-tp-snap-1";
    const b = "thinimg-tp-snap-2";
    const calls = fake({ mode: ["rw"], info: { [a]: info(a, 1), [b]: info(b, 0, "L-sw") } });
    const r = await act([orphan(1, a), orphan(2, b)], { pool: POOL });
    expect(r.results.map((x) => [x.outcome, x.skipReason])).toEqual([
      ["skipped", `${a}: open count is now 1`],
      ["skipped", `${b}: now suspended`],
    ]);
    expect(calls.some((c) => c.argv.includes("remove") || c.argv.includes("message"))).toBe(false);
  });

  test("umount busy: skipped, device left", async () => {
    const dev = "thinimg-tp-layer-3";
    const calls = fake({ mode: ["rw"], info: { [dev]: info(dev, 1) }, umount: { "/s/mnt/l3": "busy" } });
    const r = await act([orphan(3, dev, { unmount: ["/s/mnt/l3"] })], { pool: POOL, mountinfo: mi(["/s/mnt/l3", "254:7"]) });
    expect(r.results[0]!.outcome).toBe("skipped");
    expect(r.results[0]!.steps.map((s) => [s.op, s.outcome])).toEqual([
      ["claim", "ok"],
      ["check", "ok"],
      ["umount", "busy"],
    ]);
    expect(calls.some((c) => c.argv.includes("remove"))).toBe(false);
  });

  test("claim refused (DB rows changed since the scan, a lock holder appeared): skipped, nothing sent", async () => {
    const dev = "thinimg-tp-layer-3";
    const calls = fake({ mode: ["rw"], info: { [dev]: info(dev) } });
    const l: GcLedger = { ...recLedger().l, claim: () => "its DB rows changed since the scan" };
    const r = await act([orphan(3, dev, { unmount: ["/s/mnt/l3"] })], { pool: POOL, ledger: l, mountinfo: mi(["/s/mnt/l3", "254:7"]) });
    expect(r.results[0]!.outcome).toBe("skipped");
    expect(r.results[0]!.skipReason).toContain("changed since the scan");
    expect(calls.some((c) => c.argv[0] === "umount" || c.argv.includes("remove") || c.argv.includes("message") || c.argv.includes("info"))).toBe(false);
  });

  test("open count 1 is allowed only for our own mount, and something else mounted at our path is not unmounted", async () => {
    const dev = "thinimg-tp-layer-3";
    let calls = fake({ mode: ["rw"], info: { [dev]: info(dev, 1) } });
    // our mount is not there (someone else opened it): open 1 is not ours
    let r = await act([orphan(3, dev, { unmount: ["/s/mnt/l3"] })], { pool: POOL, mountinfo: mi() });
    expect(r.results[0]!.skipReason).toContain("open count is now 1");
    expect(calls.some((c) => c.argv[0] === "umount")).toBe(false);
    // a different device is mounted at our path now
    calls = fake({ mode: ["rw"], info: { [dev]: info(dev, 0) } });
    r = await act([orphan(3, dev, { unmount: ["/s/mnt/l3"] })], { pool: POOL, mountinfo: mi(["/s/mnt/l3", "8:1"]) });
    expect(r.results[0]!.outcome).toBe("skipped");
    expect(r.results[0]!.skipReason).toContain("8:1 mounted");
    expect(calls.some((c) => c.argv[0] === "umount" || c.argv.includes("remove"))).toBe(false);
    // still open after our unmount: no remove
    calls = fake({ mode: ["rw"], info: { [dev]: info(dev, 1) } });
    r = await act([orphan(3, dev, { unmount: ["/s/mnt/l3"] })], { pool: POOL, mountinfo: mi(["/s/mnt/l3", "254:7"]) });
    expect(r.results[0]!.skipReason).toContain("open count is 1 after our unmount");
    expect(calls.some((c) => c.argv.includes("remove"))).toBe(false);
  });

  test("same name, same major:minor, but another table (the kernel reused the number): changed, not removed", async () => {
    const dev = "thinimg-tp-snap-4";
    const scanned = new Map([
      [
        dev,
        {
          name: dev,
          major: 254,
          minor: 7,
          open: 0,
          suspended: false,
          inactiveTable: false,
          table: "0 8 thin 254:0 4",
          thin: { poolMajorMinor: "254:0", thinId: 4, sectors: 8 },
        },
      ],
    ]);
    let calls = fake({ mode: ["rw"], info: { [dev]: info(dev) }, table: { [dev]: "0 8 thin 254:0 5" } });
    let r = await act([orphan(4, dev)], { pool: POOL, scanned });
    expect(r.results[0]!.skipReason).toContain("table changed");
    expect(calls.some((c) => c.argv.includes("remove") || c.argv.includes("message"))).toBe(false);
    calls = fake({ mode: ["rw"], info: { [dev]: info(dev) }, table: { [dev]: "0 8 thin 254:0 4" } });
    r = await act([orphan(4, dev)], { pool: POOL, scanned });
    expect(r.results[0]!.outcome).toBe("done");
  });

  test("delete: 'No such device' is never 'gone'; a pool that vanished stops the run", async () => {
    const { ev, l } = recLedger();
    // pool still there: the delete failed, the intent is undone
    fake({ mode: ["rw"], info: { [POOL]: info(POOL) }, del: { 1: "nodev" } });
    let r = await act([orphan(1, null)], { pool: POOL, ledger: l });
    expect(r.results[0]!.outcome).toBe("failed");
    expect(r.stopped).toBeNull();
    expect(ev).toEqual(["deleting 1", "aborted 1"]);
    // pool gone: stop, nothing more is tried, nothing is recorded deleted
    const calls = fake({ mode: ["rw"], info: {}, del: { 1: "nodev" } });
    r = await act([orphan(1, null), orphan(2, null)], { pool: POOL, ledger: l });
    expect(r.results.map((x) => x.outcome)).toEqual(["failed", "not_run"]);
    expect(r.stopped?.reason).toBe("pool_gone");
    expect(calls.some((c) => c.argv.join(" ").includes("delete 2"))).toBe(false);
    expect(ev).not.toContain("deleted 1");
  });

  test("a timeout fails the orphan and stops the run (the host may be wedged)", async () => {
    const a = "thinimg-tp-snap-1";
    fake({ mode: ["rw"], info: { [a]: info(a) }, remove: { [a]: "timeout" } });
    const r = await act([orphan(1, a), orphan(2, null)], { pool: POOL });
    expect(r.results.map((x) => x.outcome)).toEqual(["failed", "not_run"]);
    expect(r.stopped?.reason).toBe("timeout");
  });

  test("abort signal: stop before the next orphan", async () => {
    fake({ mode: ["rw"] });
    const ac = new AbortController();
    ac.abort();
    const r = await act([orphan(1, null)], { pool: POOL, signal: ac.signal });
    expect(r.stopped?.reason).toBe("aborted");
    expect(r.results[0]!.outcome).toBe("not_run");
  });
});

describe("report", () => {
  const base = {
    pool: POOL,
    stateDir: "/s",
    graceMs: 600_000,
    startedAt: 0,
    finishedAt: 5,
    lock: { status: "acquired" as const, holder: null },
    health: { ok: true, detail: "ok" },
    scan: {
      ours: 1,
      foreign: 0,
      unrelated: 0,
      metadata: { status: "ok" as const, method: "thin_ls", thinIds: 3, staleHold: null, skipped: null },
      dbKnown: true,
    },
    act: null,
    repairsApplied: false,
    reconciled: 0,
    refused: null,
    kernelMessages: [],
    notes: [],
  };
  const plan = {
    pool: POOL,
    actions: [orphan(7, "thinimg-tp-snap-7", { unmount: ["/s/mnt/x"] })],
    skips: [],
    repairs: [],
    detached: [],
    foreign: [],
    notes: [],
  };

  test("dry-run lists the exact commands; exit 0", () => {
    expect(commandsFor(POOL, plan.actions[0]!)).toEqual(["umount /s/mnt/x", "dmsetup remove thinimg-tp-snap-7", 'dmsetup message tp 0 "delete 7"']);
    const r = buildReport({ ...base, mode: "dry_run", plan });
    expect(r.exit_code).toBe(0);
    expect(r.orphans[0]!.outcome).toBe("would_remove");
    expect(Object.keys(r)).toEqual([
      "ok",
      "exit_code",
      "mode",
      "pool",
      "state_dir",
      "grace_ms",
      "started_at",
      "duration_ms",
      "lock",
      "health",
      "refused",
      "reconciled",
      "scan",
      "orphans",
      "skipped",
      "repairs",
      "detached",
      "foreign",
      "stopped",
      "kernel_messages",
      "notes",
      "summary",
    ]);
  });

  test("an unhealthy dry-run: exit 1, the health line first, the metadata not read", () => {
    const detail = "health check pool.suspended blocks dm work: pool tp is SUSPENDED (dmsetup info: State SUSPENDED): every I/O on its devices waits";
    const r = buildReport({
      ...base,
      mode: "dry_run",
      plan,
      health: { ok: false, detail },
      scan: { ...base.scan, metadata: { status: "skipped" as const, method: null, thinIds: null, staleHold: null, skipped: `unhealthy: ${detail}` } },
    });
    expect(r.exit_code).toBe(1);
    expect(r.scan.metadata_skipped).toStartWith("unhealthy: ");
    expect(formatHuman(r).split("\n")[1]).toBe(`UNHEALTHY (metadata not read; report from dmsetup alone): ${detail}`);
  });

  test("gc --timeout below 1s is a usage error", () => {
    const p = Bun.spawnSync(["bun", "scripts/gc.ts", "--timeout", "0"], { stderr: "pipe" });
    expect(p.exitCode).toBe(2);
    expect(p.stderr.toString()).toContain("--timeout 0 is below 1s");
  });

  test("exit 1: a skip that needs a human, a refusal, a failure, a stale hold; exit 0 for too_young", () => {
    const skip = (reason: "mounted" | "too_young") => ({
      ...plan,
      actions: [],
      skips: [{ thinId: 1, device: null, reason, detail: "", orphanReason: "not_in_db" as const }],
    });
    expect(buildReport({ ...base, mode: "force", plan: skip("mounted") }).exit_code).toBe(1);
    expect(buildReport({ ...base, mode: "force", plan: skip("too_young") }).exit_code).toBe(0);
    expect(buildReport({ ...base, mode: "force", plan: null, refused: { reason: "lock_held", detail: "x" } }).exit_code).toBe(1);
    const failed = { results: [{ action: plan.actions[0]!, outcome: "failed" as const, steps: [], skipReason: null }], stopped: null, unmountedRemoved: [] };
    expect(buildReport({ ...base, mode: "force", plan, act: failed }).exit_code).toBe(1);
    const stale = {
      ...base.scan,
      metadata: { ...base.scan.metadata, status: "skipped" as const, staleHold: { heldRoot: 3, released: false }, skipped: "stale" },
    };
    expect(buildReport({ ...base, scan: stale, mode: "dry_run", plan }).exit_code).toBe(1);
    // a detached snapshot (kept) needs its re-attach: reported, exit 1, and never an orphan
    const detached = buildReport({
      ...base,
      mode: "force",
      plan: { ...plan, actions: [], detached: [{ snapshotId: 6, thinId: 6, device: "thinimg-tp-snap-6", detail: "re-attach it" }] },
    });
    expect(detached.exit_code).toBe(1);
    expect(detached.detached).toEqual([{ snapshot_id: 6, thin_id: 6, device: "thinimg-tp-snap-6", detail: "re-attach it" }]);
    expect(detached.summary).toMatchObject({ detached: 1, needs_human: true, orphans: 0 });
    expect(formatHuman(detached)).toContain("detached snapshots, kept — need re-attach (1)");
  });
});
