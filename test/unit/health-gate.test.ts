// The service's pre-flight gate (lib/server/health-gate.ts): a request proceeds only on a passed
// probe no older than the bound; a stale or missing one is checked synchronously; a blocking one is
// refused; probes never overlap, whoever asks for them (timer, refresh, requests).
import { describe, expect, test } from "bun:test";
import { ThinimgError } from "../../lib/errors.ts";
import type { CheckStatus, HealthReport } from "../../lib/health/types.ts";
import { HealthGate } from "../../lib/server/health-gate.ts";
import { statusOf } from "../../lib/server/http-error.ts";

function report(status: CheckStatus, message = "fine"): HealthReport {
  return {
    healthy: status !== "block",
    pool: "p",
    checks: [{ name: "pool.mode", status, message, runbook: status === "ok" ? "" : "run recover-pool", durationMs: 1 }],
    durationMs: 1,
  };
}

/** Checks answering from a script of statuses; counts calls and the most that ran at once. */
function scripted(statuses: CheckStatus[], o: { delayMs?: number } = {}) {
  let running = 0;
  const s = {
    calls: 0,
    maxConcurrent: 0,
    next: [...statuses],
    async check(): Promise<HealthReport> {
      s.calls++;
      running++;
      s.maxConcurrent = Math.max(s.maxConcurrent, running);
      try {
        if (o.delayMs) await Bun.sleep(o.delayMs);
        return report(s.next.length > 1 ? s.next.shift()! : s.next[0]!, "pool p is read-only (ro)");
      } finally {
        running--;
      }
    },
  };
  return s;
}

async function refusal(p: Promise<unknown>): Promise<ThinimgError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  if (!(e instanceof ThinimgError)) throw new Error(`expected a refusal, got ${String(e)}`);
  return e;
}

describe("admit", () => {
  test("no probe yet: the request waits for one (synchronous pre-flight); a passed one then admits on the cache", async () => {
    let now = 1_000_000;
    const c = scripted(["ok"]);
    const g = new HealthGate({ check: () => c.check(), maxAgeMs: 5_000, periodMs: 0, now: () => now });
    expect(await g.admit()).toBe("waited");
    expect(c.calls).toBe(1);
    now += 5_000; // exactly at the bound: still fresh
    expect(await g.admit()).toBe("cached");
    expect(c.calls).toBe(1);
    expect(g.admitted).toEqual({ cached: 1, waited: 1 });
  });

  test("a stale passed probe is not trusted: the request runs the checks now, and a block found then refuses it (503)", async () => {
    let now = 1_000_000;
    const c = scripted(["ok", "block"]);
    const g = new HealthGate({ check: () => c.check(), maxAgeMs: 5_000, periodMs: 0, now: () => now });
    await g.probe();
    now += 5_001;
    const e = await refusal(g.admit());
    expect(c.calls).toBe(2);
    expect(e.kind).toBe("unhealthy");
    expect(statusOf(e)).toBe(503);
    expect(e.message).toBe("health check pool.mode blocks dm work: pool p is read-only (ro)");
    expect(e.hint).toBe("run recover-pool");
  });

  test("a fresh blocking probe refuses at once, without another check; once it is stale a passing check admits again", async () => {
    let now = 1_000_000;
    const c = scripted(["block", "ok"]);
    const g = new HealthGate({ check: () => c.check(), maxAgeMs: 2_000, periodMs: 0, now: () => now });
    await g.probe();
    now += 1_999;
    expect((await refusal(g.admit())).kind).toBe("unhealthy");
    expect(c.calls).toBe(1);
    now += 2;
    expect(await g.admit()).toBe("waited");
    expect(c.calls).toBe(2);
  });

  test("age counts from when the probe started, not when it finished", async () => {
    let now = 1_000_000;
    const g = new HealthGate({
      check: async () => {
        now += 4_000; // a slow probe
        return report("ok");
      },
      maxAgeMs: 5_000,
      periodMs: 0,
      now: () => now,
    });
    await g.probe();
    expect(g.lastProbe!.startedAt).toBe(1_000_000);
    now += 1_001;
    expect(await g.admit()).toBe("waited");
  });

  test("checks that throw are a blocking finding, never a pass", async () => {
    const g = new HealthGate({
      check: async () => {
        throw new Error("cannot read /proc/stat");
      },
      periodMs: 0,
    });
    const e = await refusal(g.admit());
    expect(e.kind).toBe("unhealthy");
    expect(e.message).toBe("health check preflight blocks dm work: the health checks failed: cannot read /proc/stat");
  });

  test("warnings admit", async () => {
    const g = new HealthGate({ check: async () => report("warn"), periodMs: 0 });
    expect(await g.admit()).toBe("waited");
    expect(await g.admit()).toBe("cached");
  });
});

describe("the probe", () => {
  test("never overlaps itself: requests, refreshes and probes asked while one runs all share it", async () => {
    const c = scripted(["ok"], { delayMs: 50 });
    const g = new HealthGate({ check: () => c.check(), periodMs: 0 });
    g.refresh();
    const all = await Promise.all([g.probe(), g.admit(), g.admit(), g.probe()]);
    expect(c.calls).toBe(1);
    expect(c.maxConcurrent).toBe(1);
    expect(all[0]).toBe(all[3]);
    // one that finished is not shared: the next refresh runs the checks again
    g.refresh();
    await g.settled();
    expect(c.calls).toBe(2);
  });

  test("the timer probes every period and never starts one while one runs (checks slower than the period)", async () => {
    const c = scripted(["ok"], { delayMs: 60 });
    const g = new HealthGate({ check: () => c.check(), periodMs: 40, maxAgeMs: 1_000 });
    g.start();
    await Bun.sleep(400);
    await g.stop();
    const calls = c.calls;
    expect(calls).toBeGreaterThanOrEqual(3);
    expect(calls).toBeLessThanOrEqual(8); // ≥ 60 ms each, back to back at most
    expect(c.maxConcurrent).toBe(1);
    g.refresh(); // a request that finished during the stop
    await Bun.sleep(100);
    expect(c.calls).toBe(calls); // stopped: no timer, no refresh
  });

  test("a tick finding a probe younger than the period (a refresh after a dm operation) skips", async () => {
    const c = scripted(["ok"]);
    const g = new HealthGate({ check: () => c.check(), periodMs: 300 });
    g.start(); // probes at once
    await Bun.sleep(150);
    expect(c.calls).toBe(1);
    g.refresh(); // a dm operation at 150 ms: the next tick-driven probe is due 300 ms after it (450 ms)
    await Bun.sleep(450); // and the one after that at 750 ms
    await g.stop();
    expect(c.calls).toBe(3);
  });
});
