// The state dir's reader-writer contract (lib/lock/holders.ts) between real processes: unpack,
// activate and release hold it shared for their whole run; gc --force and recover-pool need it alone.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { EXCLUSIVE_FILE, HOLDERS_DIR, holdExclusive, releaseLingeringHolds, sharedHolders, withSharedHold } from "../../lib/lock/holders.ts";
import { holderRecord } from "../../lib/lock/process-lock.ts";
import { log } from "../../lib/log.ts";

const root = mkdtempSync("/tmp/thinimg-holders-");
const lib = join(import.meta.dir, "../../lib");
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const stateDir = () => {
  const d = join(root, `s${++n}`);
  mkdirSync(d);
  return d;
};

/** A child holding the state dir shared for `ms`, as `command`; resolves once it holds it. */
async function sharedChild(dir: string, command: string, ms: number) {
  const p = Bun.spawn(
    [
      "bun",
      "-e",
      `import { withSharedHold } from "${lib}/lock/holders.ts";
      await withSharedHold(${JSON.stringify(dir)}, { waitMs: 0, command: ${JSON.stringify(command)} }, async () => { console.log("held"); await Bun.sleep(${ms}); });`,
    ],
    { stdout: "pipe", stderr: "inherit" },
  );
  const { value } = await p.stdout.getReader().read();
  expect(new TextDecoder().decode(value)).toContain("held");
  return p;
}

describe("shared holders vs exclusive", () => {
  test("one process, overlapping holds (a service's activation during a job): the hold lasts until the last one ends", async () => {
    const d = stateDir();
    const files = () => readdirSync(join(d, HOLDERS_DIR));
    const job = Promise.withResolvers<void>();
    const long = withSharedHold(d, { waitMs: 0, command: "serve (job)" }, () => job.promise);
    await withSharedHold(d, { waitMs: 0, command: "serve (activation)" }, async () => {
      expect(files()).toHaveLength(1);
    });
    // the activation ended; the job still holds the state dir: an exclusive holder must still wait
    expect(files()).toHaveLength(1);
    const gc = Bun.spawnSync([
      "bun",
      "-e",
      `import { holdExclusive } from "${lib}/lock/holders.ts";
      await holdExclusive(${JSON.stringify(d)}, { waitMs: 0, ignoreLock: false, what: "gc --force" }).then(() => console.log("held"), (e) => console.log(e.kind));`,
    ]);
    expect(gc.stdout.toString().trim()).toBe("conflict");
    job.resolve();
    await long;
    expect(files()).toEqual([]);
  });

  test("a service's hold lingers after its last operation, is joined by the next, and yields to a waiting gc --force", async () => {
    const d = stateDir();
    const files = () => readdirSync(join(d, HOLDERS_DIR));
    const o = { waitMs: 5_000, command: "serve (activation)", lingerMs: 300 };
    await withSharedHold(d, o, async () => {});
    expect(files()).toHaveLength(1); // idle, still held: the next request joins it
    const gcNow = () =>
      Bun.spawnSync([
        "bun",
        "-e",
        `import { holdExclusive } from "${lib}/lock/holders.ts";
        await holdExclusive(${JSON.stringify(d)}, { waitMs: 0, ignoreLock: false, what: "gc --force" }).then((h) => { h.release(); console.log("held"); }, (e) => console.log(e.kind));`,
      ])
        .stdout.toString()
        .trim();
    expect(gcNow()).toBe("conflict");
    await Bun.sleep(600); // idle for longer than lingerMs: nothing is held
    expect(files()).toEqual([]);
    expect(gcNow()).toBe("held");

    // a gc --force waiting for the lingering hold gets it at once, long before the linger ends
    const long = { ...o, lingerMs: 60_000 };
    await withSharedHold(d, long, async () => {});
    const t1 = Date.now();
    const waited = Bun.spawn(
      [
        "bun",
        "-e",
        `import { holdExclusive } from "${lib}/lock/holders.ts";
        await holdExclusive(${JSON.stringify(d)}, { waitMs: 20_000, ignoreLock: false, what: "gc --force" }).then((h) => { h.release(); console.log("held"); });`,
      ],
      { stdout: "pipe", stderr: "inherit" },
    );
    expect((await new Response(waited.stdout).text()).trim()).toBe("held");
    expect(Date.now() - t1).toBeLessThan(5_000);
    expect(files()).toEqual([]);

    // and an operation arriving while it waits gives the hold up at once and waits its turn
    await withSharedHold(d, long, async () => {});
    const gc = Bun.spawn(
      [
        "bun",
        "-e",
        `import { holdExclusive } from "${lib}/lock/holders.ts";
        const h = await holdExclusive(${JSON.stringify(d)}, { waitMs: 20_000, ignoreLock: false, what: "gc --force" });
        console.log("gc held"); await Bun.sleep(300); h.release(); console.log("gc released");`,
      ],
      { stdout: "pipe", stderr: "inherit" },
    );
    while (!existsSync(join(d, EXCLUSIVE_FILE))) await Bun.sleep(10); // it waits for our hold
    const t0 = Date.now();
    await withSharedHold(d, long, async () => {
      // runs only once gc is done: it had the state dir alone meanwhile
      expect(existsSync(join(d, EXCLUSIVE_FILE))).toBe(false);
    });
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(await new Response(gc.stdout).text()).toBe("gc held\ngc released\n");
    await releaseLingeringHolds();
    expect(files()).toEqual([]);
  }, 30_000);

  test("gc --force with --wait 0 is refused with one line naming every live holder; nothing is left claimed", async () => {
    const d = stateDir();
    const a = await sharedChild(d, "bun scripts/unpack.ts alpine --name a", 60_000);
    const b = await sharedChild(d, "bun scripts/activate.ts a", 60_000);
    try {
      const e = await holdExclusive(d, { waitMs: 0, ignoreLock: false, command: "bun scripts/gc.ts --force", what: "gc --force" }).catch((x) => x);
      expect(e.kind).toBe("conflict");
      expect(e.message).not.toContain("\n");
      expect(e.message).toStartWith("gc --force: the state dir is in use by 2 processes: ");
      for (const [p, cmd] of [
        [a, "unpack.ts alpine"],
        [b, "activate.ts a"],
      ] as const) {
        expect(e.message).toContain(`pid ${p.pid} (bun scripts/${cmd}`);
      }
      expect(e.message).toMatch(/since \d{4}-\d\d-\d\dT/);
      expect(existsSync(join(d, EXCLUSIVE_FILE))).toBe(false);
    } finally {
      a.kill(9);
      b.kill(9);
      await Promise.all([a.exited, b.exited]);
    }
  }, 30_000);

  test("it waits up to --wait for holders to finish, then holds the dir; new shared holders wait for it", async () => {
    const d = stateDir();
    const a = await sharedChild(d, "bun scripts/release.ts 1", 700);
    const t0 = Date.now();
    const hold = await holdExclusive(d, { waitMs: 10_000, ignoreLock: false, command: "bun scripts/gc.ts --force", what: "gc --force" });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(400);
    await a.exited;
    // while it is held, a shared holder waits, and is refused past its own wait, naming it
    const late = Bun.spawn(
      [
        "bun",
        "-e",
        `import { withSharedHold } from "${lib}/lock/holders.ts";
        try { await withSharedHold(${JSON.stringify(d)}, { waitMs: 300 }, async () => console.log("ran")); } catch (e) { console.log(e.message); }`,
      ],
      { stdout: "pipe", stderr: "pipe" },
    );
    const out = await new Response(late.stdout).text();
    expect(out).toContain(`the state dir is held exclusively by pid ${process.pid} (bun scripts/gc.ts --force)`);
    expect(out).not.toContain("ran");
    hold.release();
    expect(existsSync(join(d, EXCLUSIVE_FILE))).toBe(false);
    expect(await withSharedHold(d, { waitMs: 0 }, async () => "ran")).toBe("ran");
    expect(readdirSync(join(d, HOLDERS_DIR))).toEqual([]);
  }, 30_000);

  test("files of dead holders never block, and are removed", async () => {
    const d = stateDir();
    const dead = Bun.spawn(["true"]);
    await dead.exited;
    mkdirSync(join(d, HOLDERS_DIR));
    const base = { host: (await import("node:os")).hostname(), command: "bun scripts/unpack.ts gone", acquiredAt: Date.now() };
    // files their holders left when they died: records, but nobody holds their flock
    writeFileSync(join(d, HOLDERS_DIR, `${dead.pid}-1.json`), holderRecord({ ...base, pid: dead.pid, startTime: 1 }));
    writeFileSync(join(d, HOLDERS_DIR, "1-12345.json"), holderRecord({ ...base, pid: 1, startTime: 12345 }));
    writeFileSync(join(d, EXCLUSIVE_FILE), holderRecord({ ...base, pid: dead.pid, startTime: 1, command: "bun scripts/gc.ts --force" }));
    expect(sharedHolders(d)).toEqual([]);
    const hold = await holdExclusive(d, { waitMs: 0, ignoreLock: false, what: "gc --force" });
    expect(hold.ignored).toEqual([]);
    expect(readdirSync(join(d, HOLDERS_DIR))).toEqual([]);
    hold.release();
  });

  test("--ignore-lock goes ahead at once with a warning naming the holders", async () => {
    const d = stateDir();
    const a = await sharedChild(d, "bun scripts/unpack.ts busy", 60_000);
    const warned: string[] = [];
    const orig = log.warn;
    log.warn = ((m: unknown) => void warned.push(String(m))) as typeof log.warn;
    try {
      const t0 = Date.now();
      const hold = await holdExclusive(d, { waitMs: 60_000, ignoreLock: true, what: "recover-pool" });
      expect(Date.now() - t0).toBeLessThan(2_000);
      expect(hold.ignored.map((h) => h.pid)).toEqual([a.pid]);
      expect(warned.join("\n")).toContain(`recover-pool --ignore-lock: going ahead while the state dir is held by pid ${a.pid} (bun scripts/unpack.ts busy)`);
      hold.release();
    } finally {
      log.warn = orig;
      a.kill(9);
      await a.exited;
    }
  }, 30_000);

  test("a state dir that does not exist has no holders", async () => {
    const hold = await holdExclusive(join(root, "nope"), { waitMs: 0, ignoreLock: false, what: "recover-pool" });
    expect(hold.ignored).toEqual([]);
    expect(existsSync(join(root, "nope"))).toBe(false);
  });
});
