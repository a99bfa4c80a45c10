// No retry after a timeout: umount and `dmsetup remove` on the pipeline's paths are tried once more
// only when the first answer was "busy", after a fixed delay; a timeout or any other failure fails at
// once. The commands are answered by a fake runner; test/vm/host-safety.test.ts checks the same rule
// against the real kernel.
import { afterEach, describe, expect, test } from "bun:test";
import * as dmsetup from "../../lib/dm/dmsetup.ts";
import * as mnt from "../../lib/dm/mount.ts";
import { type CmdResult, type Runner, setRunner, spawnRunner } from "../../lib/exec.ts";
import { clearTimeouts } from "../../lib/lock/host-queue.ts";
import { log } from "../../lib/log.ts";
import { isTimeout, retryBusyOnce } from "../../lib/pipeline/retry.ts";

afterEach(() => {
  setRunner(spawnRunner);
  clearTimeouts();
});

type Answer = "ok" | "busy" | "timeout" | "eio";
const answer = (argv: string[], a: Answer): CmdResult => {
  const base = { argv, stdout: "", signal: null, durationMs: 1 };
  if (a === "ok") return { ...base, stderr: "", exitCode: 0, timedOut: false };
  if (a === "timeout") return { ...base, stderr: "", exitCode: null, signal: "SIGKILL", timedOut: true, durationMs: 60_000 };
  if (a === "busy") {
    const stderr =
      argv[0] === "umount"
        ? "umount: /m: target is busy.\n"
        : "device-mapper: remove ioctl on thinimg-p-layer-1  failed: Device or resource busy\nCommand failed.\n";
    return { ...base, stderr, exitCode: argv[0] === "umount" ? 32 : 1, timedOut: false };
  }
  return { ...base, stderr: `${argv[0]}: Input/output error\n`, exitCode: 1, timedOut: false };
};

/** A runner answering each call with the next answer; records every command. */
function scripted(answers: Answer[]): string[][] {
  const calls: string[][] = [];
  const r: Runner = async (argv) => {
    calls.push(argv);
    return answer(argv, answers[calls.length - 1] ?? "ok");
  };
  setRunner(r);
  return calls;
}

const ops = {
  umount: () => mnt.umount("/tmp/thinimg-unit-m", { timeoutMs: 5 }),
  "dmsetup remove": () => dmsetup.remove("thinimg-p-layer-1", { timeoutMs: 5 }),
};

function warnings(): { lines: string[]; stop: () => void } {
  const lines: string[] = [];
  const orig = log.warn;
  log.warn = ((...a: unknown[]) => void lines.push(a.map(String).join(" "))) as typeof log.warn;
  const stop = () => {
    log.warn = orig;
  };
  return { lines, stop };
}

describe("dm commands on the pipeline's paths", () => {
  for (const [name, op] of Object.entries(ops)) {
    test(`${name}: a timeout is final — exactly one command, the error says it timed out`, async () => {
      const calls = scripted(["timeout", "ok"]);
      const e = await retryBusyOnce(name, op, 1).catch((x) => x);
      expect(calls.length).toBe(1);
      expect(isTimeout(e)).toBe(true);
      expect(String(e.message)).toContain("timed out");
    });

    test(`${name}: "busy" is tried once more after the fixed delay, and the retry is logged`, async () => {
      const calls = scripted(["busy", "ok"]);
      const w = warnings();
      const t0 = performance.now();
      try {
        await retryBusyOnce(name, op, 50);
      } finally {
        w.stop();
      }
      expect(calls.length).toBe(2);
      expect(performance.now() - t0).toBeGreaterThanOrEqual(45);
      expect(w.lines.some((l) => l.includes(name) && l.includes("busy") && l.includes("one more try in 50 ms"))).toBe(true);
    });

    test(`${name}: busy twice fails after the second command (never a third)`, async () => {
      const calls = scripted(["busy", "busy", "ok"]);
      const w = warnings();
      const e = await retryBusyOnce(name, op, 1)
        .catch((x) => x)
        .finally(w.stop);
      expect(calls.length).toBe(2);
      expect(String(e.message)).toMatch(/busy/i);
    });

    test(`${name}: busy, then a timeout: two commands, the timeout is the error`, async () => {
      const calls = scripted(["busy", "timeout", "ok"]);
      const w = warnings();
      const e = await retryBusyOnce(name, op, 1)
        .catch((x) => x)
        .finally(w.stop);
      expect(calls.length).toBe(2);
      expect(isTimeout(e)).toBe(true);
    });

    test(`${name}: any other failure (I/O error) fails dumb at once`, async () => {
      const calls = scripted(["eio", "ok"]);
      const e = await retryBusyOnce(name, op, 1).catch((x) => x);
      expect(calls.length).toBe(1);
      expect(isTimeout(e)).toBe(false);
      expect(String(e.message)).toContain("Input/output error");
    });
  }
});
