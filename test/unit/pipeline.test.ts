// Decision logic of the pipeline on the host (no kernel): chain ids, device names, config, failure
// classification, and how interrupted intents are settled from the pool's transaction id and
// metadata. The dm commands are answered by a fake runner here; test/vm/crash.test.ts exercises the
// same paths on the real kernel.
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { envDuration, loadConfig } from "../../lib/config.ts";
import { liveMetadataReader } from "../../lib/dm/metadata-snap.ts";
import { ThinimgError } from "../../lib/errors.ts";
import { type CmdResult, CommandError, type Runner, setRunner, spawnRunner } from "../../lib/exec.ts";
import { chainIds } from "../../lib/pipeline/chain.ts";
import { classify, failure, isPermanent } from "../../lib/pipeline/failure.ts";
import { defaultImageName } from "../../lib/pipeline/unpack.ts";
import { makeCtx } from "../../lib/pool/context.ts";
import { poolCreate, readPoolThinIds, reconcilePending } from "../../lib/pool/journal.ts";
import { deviceName, parseDeviceName } from "../../lib/pool/names.ts";
import { tx } from "../../lib/store/db.ts";
import { beginImage } from "../../lib/store/images.ts";
import { insertLayer } from "../../lib/store/layers.ts";
import { insertSnapshot } from "../../lib/store/snapshots.ts";
import { allocateThinId, getThinId, setThinIdState } from "../../lib/store/thin-ids.ts";
import { beginStep, listWork, startWork, stepsOf } from "../../lib/store/work.ts";
import { cmdResult } from "../helpers/run.ts";

const dir = mkdtempSync("/tmp/thinimg-pipeline-unit-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => void setRunner(spawnRunner));

const sha = (s: string) => `sha256:${new Bun.CryptoHasher("sha256").update(s).digest("hex")}`;

describe("chain ids", () => {
  test("OCI ChainID: first = identity, then sha256(parent + ' ' + identity); identity = diffId ?? digest", () => {
    const d1 = sha("a");
    const d2 = sha("b");
    const blob3 = sha("c-compressed");
    const c = chainIds([
      { diffId: d1, digest: sha("x") },
      { diffId: d2, digest: sha("y") },
      { diffId: null, digest: blob3 },
    ]);
    expect(c[0]).toBe(d1);
    expect(c[1]).toBe(sha(`${d1} ${d2}`));
    expect(c[2]).toBe(sha(`${c[1]} ${blob3}`));
    // a shared prefix gives shared chain ids; the same layer on another base does not
    expect(
      chainIds([
        { diffId: d1, digest: "" },
        { diffId: d2, digest: "" },
      ]),
    ).toEqual(c.slice(0, 2));
    expect(chainIds([{ diffId: d2, digest: "" }])[0]).not.toBe(c[1]);
  });
});

describe("names", () => {
  test("device names carry prefix, pool, kind and id; anything else is not ours", () => {
    expect(deviceName("thinimg", "pool1", "layer", 7)).toBe("thinimg-pool1-layer-7");
    expect(parseDeviceName("thinimg", "pool1", "thinimg-pool1-snap-16777215")).toEqual({ kind: "snap", thinId: 16777215 });
    for (const n of [
      "thinimg-pool2-layer-7",
      "other-pool1-layer-7",
      "thinimg-pool1-layer-07",
      "thinimg-pool1-layer-16777216",
      "thinimg-pool1-disk-1",
      "thinimg-pool1-layer-1x",
    ]) {
      expect(parseDeviceName("thinimg", "pool1", n)).toBeNull();
    }
    expect(() => deviceName("thinimg", "pool 1", "layer", 1)).toThrow(/invalid device name/);
    expect(() => deviceName("thinimg", "p", "layer", 2 ** 24)).toThrow(/invalid thin device id/);
  });

  test("default image names come from the source", () => {
    expect(defaultImageName("/srv/images/golang/")).toBe("golang");
    expect(defaultImageName("/tmp/app.tar.gz")).toBe("app");
    expect(defaultImageName("s3://bucket/families/node")).toBe("node");
    expect(defaultImageName("https://example.com/x/busybox.oci.tar")).toBe("busybox.oci");
  });
});

describe("config", () => {
  test("flags win over env, env over defaults; sizes and durations parsed", () => {
    const c = loadConfig(
      { pool: "flagpool" },
      { THINIMG_POOL: "envpool", THINIMG_STATE_DIR: "/srv/state", THINIMG_VIRTUAL_SIZE: "2G", THINIMG_LOCK_WAIT: "90s" },
    );
    expect(c).toMatchObject({
      pool: "flagpool",
      stateDir: "/srv/state",
      virtualSize: 2 * 1024 ** 3,
      lockWaitMs: 90_000,
      dbPath: "/srv/state/state.db",
      lockFile: "/srv/state/thinimg.lock",
    });
    expect(loadConfig({}, {})).toMatchObject({ pool: "thinimg-pool", stateDir: "/var/lib/thinimg", virtualSize: 10 * 1024 ** 3, prefix: "thinimg" });
  });

  test("the environment-only durations (dm queue wait, tool timeouts) are checked by every command's config, not at first use", () => {
    expect(() => loadConfig({}, { THINIMG_DM_QUEUE_WAIT: "soon" })).toThrow('THINIMG_DM_QUEUE_WAIT: "soon" is not a duration');
    expect(() => loadConfig({}, { THINIMG_TIMEOUT_MKFS: "0" })).toThrow("THINIMG_TIMEOUT_MKFS 0: below 1s");
    expect(() => loadConfig({}, { THINIMG_TIMEOUT_UMOUNT: "500ms" })).toThrow("THINIMG_TIMEOUT_UMOUNT 500ms: below 1s");
    // a queue that does not wait at all is a choice; short tool timeouts (the fault tests' 2s) are fine
    expect(() => loadConfig({}, { THINIMG_DM_QUEUE_WAIT: "0", THINIMG_TIMEOUT_MKFS: "2s", THINIMG_TIMEOUT_MOUNT: "1s" })).not.toThrow();
    expect(envDuration("THINIMG_TIMEOUT_MOUNT", 30_000, { THINIMG_TIMEOUT_MOUNT: "2s" })).toBe(2000);
    expect(envDuration("THINIMG_TIMEOUT_MOUNT", 30_000, {})).toBe(30_000);
  });

  test("limits: a flag wins over its THINIMG_MAX_* variable, which wins over the default", () => {
    const env = { THINIMG_MAX_DEPTH: "64", THINIMG_MAX_PATH_BYTES: "512", THINIMG_MAX_LAYER_SIZE: "1G", THINIMG_MAX_ENTRIES: "50" };
    expect(loadConfig({ maxDepth: "8", maxBytes: "2M" }, env).limits).toEqual({
      maxBlobBytes: 8 * 1024 ** 3,
      maxLayerBytes: 2 * 1024 ** 2,
      maxFileBytes: 1024 ** 3,
      maxEntries: 50,
      maxDepth: 8,
      maxPathBytes: 512,
    });
    expect(loadConfig({}, {}).limits).toMatchObject({ maxDepth: 1024, maxPathBytes: 4096, maxEntries: 100_000 });
    expect(() => loadConfig({ maxDepth: "0" }, {})).toThrow(/--max-depth/);
    expect(() => loadConfig({}, { THINIMG_MAX_PATH_BYTES: "x" })).toThrow(/THINIMG_MAX_PATH_BYTES/);
  });

  test("bad values: one line naming the flag or variable and what to do", () => {
    const cases: [Parameters<typeof loadConfig>[0], Record<string, string>, RegExp][] = [
      [{ pool: "bad name" }, {}, /^--pool "bad name": use letters.* — use e.g. --pool NAME$/],
      [{}, { THINIMG_POOL: "p".repeat(105) }, /^THINIMG_POOL "p+…": must be at most 104 characters.* — set THINIMG_POOL to e.g. NAME, or unset it/],
      [{ maxBytes: "lots" }, {}, /^--max-bytes: "lots" is not a size/],
      [{}, { THINIMG_MAX_DEPTH: "0" }, /^THINIMG_MAX_DEPTH/],
      [{ virtualSize: "10M" }, {}, /^--virtual-size 10485760: must be at least 64M/],
      [{}, { THINIMG_VIRTUAL_SIZE: "huge" }, /^THINIMG_VIRTUAL_SIZE: "huge" is not a size/],
      [{ wait: "soon" }, {}, /^--wait: "soon" is not a duration/],
    ];
    for (const [flags, env, re] of cases) {
      let msg = "";
      try {
        loadConfig(flags, env);
      } catch (e) {
        expect(e).toBeInstanceOf(ThinimgError);
        expect((e as ThinimgError).kind).toBe("usage");
        msg = (e as ThinimgError).oneLine();
      }
      expect(msg).toMatch(re);
      expect(msg.split("\n")).toHaveLength(1);
    }
  });
});

describe("failure classification", () => {
  test("device errors reported by the applier are the host's fault, not the image's", () => {
    const eio = new ThinimgError("input", "layer 2/2: entry x: write failed: EIO", { details: { code: "EIO" } });
    expect(classify(eio)).toEqual({ kind: "dm", errorKind: "io" });
    const enospc = new ThinimgError("input", "write failed: ENOSPC", { details: { code: "ENOSPC" } });
    expect(classify(enospc)).toEqual({ kind: "dm", errorKind: "no_space" });
    const policy = new ThinimgError("policy", "layer 1: entry ../x: path escapes the root");
    expect(classify(policy).errorKind).toBe("policy");
    expect(isPermanent("policy")).toBe(true);
    expect(isPermanent("input")).toBe(true);
    expect(isPermanent("io")).toBe(false);
    expect(isPermanent("no_space")).toBe(false);
  });

  test("failed commands (sync -f, umount, mount, mkfs) are classified from their stderr", () => {
    const cmd = (argv: string[], stderr: string) => new CommandError(cmdResult(argv, { stderr, exitCode: 1 }));
    expect(classify(cmd(["sync", "-f", "/m"], "sync: error syncing '/m': Input/output error\n"))).toEqual({ kind: "dm", errorKind: "io" });
    expect(classify(cmd(["sync", "-f", "/m"], "sync: error syncing '/m': No space left on device\n"))).toEqual({ kind: "dm", errorKind: "no_space" });
    expect(
      classify(
        cmd(
          ["mount", "/dev/x", "/m"],
          "mount: /m: cannot mount /dev/x read-only.\n       dmesg(1) may have more information after failed mount system call.\nRead-only file system\n",
        ),
      ).errorKind,
    ).toBe("io");
    expect(classify(cmd(["mkfs.ext4", "/dev/x"], "mkfs.ext4: Input/output error while writing out and closing file system\n")).errorKind).toBe("io");
    // a typed error carrying the stderr in its details counts the same
    expect(classify(new ThinimgError("dm", "umount failed", { details: { stderr: "umount: /m: Input/output error" } })).errorKind).toBe("io");
    // anything else a command reports stays a dm failure
    expect(classify(cmd(["umount", "/m"], "umount: /m: not mounted.\n"))).toEqual({ kind: "dm", errorKind: "dm" });
  });

  test("the failure names every leaked resource and the GC command", () => {
    const e = failure("layer 2/5 (sha256:ab)", new Error("boom"), [
      { kind: "thin_id", ref: 7, reason: "" },
      { kind: "device", ref: "thinimg-p-layer-7", reason: "" },
      { kind: "mount", ref: "/var/lib/thinimg/mnt/thinimg-p-layer-7", reason: "" },
    ]);
    expect(e.oneLine()).toBe(
      "layer 2/5 (sha256:ab): boom — left in place (nothing was cleaned up): thin id 7, device thinimg-p-layer-7, mount /var/lib/thinimg/mnt/thinimg-p-layer-7; review with `bun scripts/gc.ts` (dry-run), remove with `bun scripts/gc.ts --force`",
    );
  });
});

describe("settling intents of dead processes", () => {
  /** A dead process's pid: a child that has exited. */
  async function deadPid(): Promise<number> {
    const p = Bun.spawn(["true"]);
    await p.exited;
    return p.pid;
  }

  function fakePool(o: { txn: number; ids: number[] }): string[][] {
    const calls: string[][] = [];
    const ok = (argv: string[], stdout: string): CmdResult => cmdResult(argv, { stdout });
    let held: number | null = null; // the metadata snapshot our reserve takes
    const runner: Runner = async (argv) => {
      calls.push(argv);
      const a = argv.join(" ");
      if (a.includes(" status "))
        return ok(argv, `0 2097152 thin-pool ${o.txn} 100/4096 10/16384 ${held ?? "-"} rw no_discard_passdown error_if_no_space - 1024\n`);
      if (a.includes(" table ")) return ok(argv, "0 2097152 thin-pool 7:0 7:1 128 1638 1 error_if_no_space\n");
      if (a.includes(" message ")) {
        if (a.endsWith("reserve_metadata_snap")) held = 42;
        if (a.endsWith("release_metadata_snap")) held = null;
        return ok(argv, "");
      }
      if (argv[0] === "thin_ls") return ok(argv, o.ids.map((id) => `${id} 10`).join("\n"));
      throw new Error(`unexpected command ${a}`);
    };
    setRunner(runner);
    return calls;
  }

  test("transaction id advanced → created; unproven and present → orphaned; unproven and absent → retried with the same id; dead activation → orphaned", async () => {
    const cfg = loadConfig({ stateDir: join(dir, "s1"), pool: "pp" }, {});
    const ctx = makeCtx(cfg, { command: "unit" });
    const { db } = ctx;
    const dead = { pid: await deadPid(), startTime: 1, host: ctx.owner.host, command: "bun scripts/unpack.ts x" };
    const layer = (c: string) =>
      insertLayer(db, { pool: "pp", chainId: c, parentId: null, parentChainId: null, identity: c, diffId: null, digest: c, size: 1, virtualSize: 1 << 30 });
    const mk = (txnBefore: number, kind: "build_layer" | "activate", subject: string, ownerKind: "layer" | "snapshot", ownerId: number) => {
      const id = allocateThinId(db, "pp", { kind: ownerKind, id: ownerId });
      const w = startWork(db, "pp", kind, subject, dead);
      beginStep(db, w.id, "pp", "create_thin", { thinId: id, txnBefore, txnAfter: kind === "activate" ? null : txnBefore + 1 });
      if (kind === "activate") tx(db, () => db.query("UPDATE steps SET txn_before = NULL WHERE work_id = ?").run(w.id));
      return { id, work: w.id };
    };
    const proven = mk(4, "build_layer", "layer:1", "layer", layer("sha256:1").id); // pool txn is 5 = 4+1
    const present = mk(5, "build_layer", "layer:2", "layer", layer("sha256:2").id); // txn still 5, id in pool
    const absent = mk(5, "build_layer", "layer:3", "layer", layer("sha256:3").id); // txn still 5, id not in pool
    const img = beginImage(db, { pool: "pp", name: "i", source: "/s", format: null });
    const snap = insertSnapshot(db, { pool: "pp", imageId: img.id, layerId: 1, virtualSize: 1 << 30, pid: dead.pid, command: "x" });
    const act = mk(5, "activate", `snapshot:${snap.id}`, "snapshot", snap.id);
    const calls = fakePool({ txn: 5, ids: [proven.id, present.id, act.id] });

    expect(await reconcilePending(ctx)).toBe(8); // 4 steps + 4 dead work rows
    expect(getThinId(db, "pp", proven.id)!.state).toBe("created");
    expect(getThinId(db, "pp", present.id)!.state).toBe("orphaned");
    expect(getThinId(db, "pp", present.id)!.reason).toContain("it is in the pool");
    expect(getThinId(db, "pp", absent.id)!.state).toBe("allocated");
    expect(getThinId(db, "pp", act.id)!.state).toBe("orphaned");
    expect(stepsOf(db, proven.work)[0]).toMatchObject({ state: "done" });
    expect(stepsOf(db, present.work)[0]).toMatchObject({ state: "failed" });
    expect(listWork(db, "pp", ["running"])).toEqual([]);
    expect(db.query("SELECT state FROM snapshots WHERE id = ?").get(snap.id)).toEqual({ state: "failed" });
    // the metadata snapshot was always released, and nothing but reads and the snapshot hold ran
    const msgs = calls.filter((c) => c.includes("message")).map((c) => c.at(-1));
    expect(msgs).toEqual(["reserve_metadata_snap", "release_metadata_snap"]);
    // settled once: a second pass finds nothing
    expect(await reconcilePending(ctx)).toBe(0);
    ctx.db.close();
  });

  test("a create that timed out stays pending (the kernel may have done it); the next run settles it", async () => {
    const ctx = makeCtx(loadConfig({ stateDir: join(dir, "s3"), pool: "pp" }, {}), { command: "unit" });
    const { db } = ctx;
    const id = allocateThinId(db, "pp", { kind: "layer", id: null });
    const w = startWork(db, "pp", "build_layer", "layer:9", ctx.owner);
    let txn = 7;
    const ok = (argv: string[], stdout: string): CmdResult => cmdResult(argv, { stdout });
    setRunner(async (argv) => {
      const a = argv.join(" ");
      if (a.includes(" status ")) return ok(argv, `0 2097152 thin-pool ${txn} 100/4096 10/16384 - rw no_discard_passdown error_if_no_space - 1024\n`);
      if (a.includes("create_thin")) {
        txn++; // the kernel did it; the command still timed out
        return { argv, stdout: "", stderr: "", exitCode: null, signal: "SIGKILL", timedOut: true, durationMs: 10_000 };
      }
      if (a.includes("create_snap")) return cmdResult(argv, { stderr: "device-mapper: message ioctl on pp failed: Invalid argument\n", exitCode: 1 });
      throw new Error(`unexpected command ${a}`);
    });
    const err = await poolCreate(ctx, w.id, { op: "create_thin", thinId: id }).catch((e) => e);
    expect(err).toBeInstanceOf(Error);
    expect(stepsOf(db, w.id).map((s) => s.state)).toEqual(["pending"]);
    expect(getThinId(db, "pp", id)!.state).toBe("allocated");
    // a refusal the kernel reported is a definite outcome: that step is closed failed
    const id2 = allocateThinId(db, "pp", { kind: "layer", id: null });
    await poolCreate(ctx, w.id, { op: "create_snap", thinId: id2, originId: id }).catch(() => {});
    expect(stepsOf(db, w.id).map((s) => s.state)).toEqual(["pending", "failed"]);
    // the process dies; the next one settles the pending create from the transaction id
    db.query("UPDATE work SET pid = ?, start_time = 1 WHERE id = ?").run(await deadPid(), w.id);
    txn = 7 + 1;
    expect(await reconcilePending(ctx)).toBe(2); // the pending step + the dead work row
    expect(getThinId(db, "pp", id)!.state).toBe("created");
    expect(stepsOf(db, w.id)[0]).toMatchObject({ state: "done" });
    ctx.db.close();
  });

  test("a metadata snapshot left held by a dead process is released first; a live reader's hold is not", async () => {
    const calls: string[] = [];
    // the pool's held root: `outside` scripts a hold by someone else (one entry per status call);
    // our own reserve/release set and clear `ours`
    let outside: (number | null)[] = [];
    let ours: number | null = null;
    const ok = (argv: string[], stdout: string): CmdResult => cmdResult(argv, { stdout });
    setRunner(async (argv) => {
      const a = argv.join(" ");
      if (a.includes(" status ")) {
        const o = outside.length ? outside.shift()! : null;
        const held = ours ?? o;
        return ok(argv, `0 2097152 thin-pool 3 100/4096 10/16384 ${held ?? "-"} rw no_discard_passdown error_if_no_space - 1024\n`);
      }
      if (a.includes(" table ")) return ok(argv, "0 2097152 thin-pool /dev/loop-meta /dev/loop-data 128 1638 1 error_if_no_space\n");
      if (a.includes(" message ")) {
        const m = argv.at(-1)!;
        calls.push(m);
        if (m === "reserve_metadata_snap") ours = 88;
        if (m === "release_metadata_snap") {
          ours = null;
          outside = []; // releasing a stale hold clears it
        }
        return ok(argv, "");
      }
      if (argv[0] === "thin_ls") return ok(argv, "1 10\n2 10");
      throw new Error(`unexpected command ${a}`);
    });
    const stateDir = join(dir, "metasnap");
    mkdirSync(stateDir, { recursive: true });
    // stale: held (root 77) and unchanged through the quiet period, no metadata tool running
    outside = Array(50).fill(77);
    expect(await readPoolThinIds("pp", { stateDir, quietMs: 300 })).toEqual([1, 2]);
    expect(calls).toEqual(["release_metadata_snap", "reserve_metadata_snap", "release_metadata_snap"]);
    // live: a reader releases its own hold after two polls → we never release it for them
    calls.length = 0;
    outside = [77, 77, null];
    expect(await readPoolThinIds("pp", { stateDir, quietMs: 5_000 })).toEqual([1, 2]);
    expect(calls).toEqual(["reserve_metadata_snap", "release_metadata_snap"]);
  });

  test("a running thin tool on the pool's metadata device counts as a live reader", () => {
    const proc = join(dir, "proc");
    const put = (pid: number, argv: string[]) => {
      mkdirSync(join(proc, String(pid)), { recursive: true });
      writeFileSync(join(proc, String(pid), "cmdline"), `${argv.join("\0")}\0`);
    };
    put(10, ["bash", "-c", "thin_ls --metadata-snap /dev/loop1"]);
    put(11, ["/usr/sbin/thin_ls", "--metadata-snap", "/dev/loop9"]);
    expect(liveMetadataReader("/dev/loop1", proc)).toBeNull();
    put(12, ["/usr/sbin/thin_dump", "-m", "/dev/loop1"]);
    expect(liveMetadataReader("/dev/loop1", proc)).toStartWith("pid 12 ");
  });

  test("intents of a LIVE process are left alone", async () => {
    const ctx = makeCtx(loadConfig({ stateDir: join(dir, "s2"), pool: "pp" }, {}), { command: "unit" });
    const sleeper = Bun.spawn(["sleep", "30"]);
    try {
      const { processStartTime } = await import("../../lib/lock/owner.ts");
      const live = { pid: sleeper.pid, startTime: processStartTime(sleeper.pid), host: ctx.owner.host, command: "sleep" };
      const id = allocateThinId(ctx.db, "pp", { kind: "layer", id: null });
      const w = startWork(ctx.db, "pp", "build_layer", "layer:1", live);
      beginStep(ctx.db, w.id, "pp", "create_thin", { thinId: id, txnBefore: 1, txnAfter: 2 });
      const calls = fakePool({ txn: 2, ids: [id] });
      expect(await reconcilePending(ctx)).toBe(0);
      expect(calls).toEqual([]);
      expect(getThinId(ctx.db, "pp", id)!.state).toBe("allocated");
      setThinIdState(ctx.db, "pp", id, "created");
    } finally {
      sleeper.kill(9);
      ctx.db.close();
    }
  });
});

describe("unpack fails fast", () => {
  test("a missing pool is reported before the source is resolved or downloaded", async () => {
    let requests = 0;
    const server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch() {
        requests++;
        return new Response("not reached", { status: 404 });
      },
    });
    const dmCalls: string[] = [];
    setRunner(async (argv) => {
      dmCalls.push(argv.join(" "));
      return { argv, stdout: "", stderr: "Device does not exist.\nCommand failed.\n", exitCode: 1, signal: null, timedOut: false, durationMs: 1 };
    });
    try {
      const ctx = makeCtx(loadConfig({ stateDir: join(dir, "failfast"), pool: "gone" }, {}), { command: "unit" });
      const { unpack } = await import("../../lib/pipeline/unpack.ts");
      const err = await unpack(ctx, { source: `http://127.0.0.1:${server.port}/big.tar`, name: "big" }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ThinimgError);
      expect((err as ThinimgError).kind).toBe("unhealthy");
      expect((err as ThinimgError).message).toContain("pool gone not found");
      expect(requests).toBe(0);
      // only reads were sent: the pool's status and `dmsetup info`
      expect(dmCalls.every((c) => /^dmsetup .*\b(status|info)\b/.test(c))).toBe(true);
      ctx.db.close();
    } finally {
      server.stop(true);
    }
  });
});
