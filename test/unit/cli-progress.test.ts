import { describe, expect, test } from "bun:test";
import { formatEta, lineWidth, MIN_WIDTH, progressLine, RateMeter, ttyProgress } from "../../lib/cli/progress.ts";

describe("progress line", () => {
  test("shows the bar, bytes, rate and time left", () => {
    const MiB = 1024 ** 2;
    expect(progressLine("[2/5] apply", 120 * MiB, 300 * MiB, 40 * MiB)).toBe("[2/5] apply [########------------] 40% 120 MiB/300 MiB  40 MiB/s  5s left");
    expect(progressLine("fetch", 3 * MiB, null, 1.5 * MiB)).toBe("fetch 3.0 MiB  1.5 MiB/s");
    // no rate yet: no speed, no estimate; finished: no estimate
    expect(progressLine("x", 1, 4, null)).toBe("x [#####---------------] 25% 1 B/4 B");
    expect(progressLine("x", 4, 4, 2)).toBe("x [####################] 100% 4 B/4 B  2 B/s");
  });

  test("time left reads as seconds, minutes or hours", () => {
    expect(formatEta(4.2)).toBe("5s");
    expect(formatEta(125)).toBe("2m05s");
    expect(formatEta(3 * 3600 + 7 * 60)).toBe("3h07m");
    expect(formatEta(Number.POSITIVE_INFINITY)).toBe("");
  });

  test("a terminal reporting 0 or no columns still gets a usable line; a narrow one the minimum", () => {
    expect(lineWidth(0)).toBe(79);
    expect(lineWidth(undefined)).toBe(79);
    expect(lineWidth(20)).toBe(MIN_WIDTH);
    expect(lineWidth(200)).toBe(199);
    let out = "";
    const write = (s: string) => {
      out = s;
      return true;
    };
    const tty = { isTTY: true, columns: 0, write } as unknown as NodeJS.WriteStream;
    const p = ttyProgress(tty);
    p.stage("[1/1] apply sha256:0123456789abcdef0123456789abcdef0123456789abcdef");
    p.bytes(10, 100);
    expect(out.replace("\r\x1b[2K", "").length).toBe(79);
  });

  test("the rate is measured over a window of recent samples", () => {
    const m = new RateMeter(5_000);
    expect(m.add(0, 0)).toBeNull(); // too early to tell
    expect(m.add(1_000, 10_000)).toBe(10_000);
    expect(m.add(2_000, 20_000)).toBe(10_000);
    // a stall: the rate falls as the window moves past the fast part
    for (let t = 3_000; t <= 12_000; t += 1_000) m.add(t, 20_000);
    expect(m.add(13_000, 20_000)).toBe(0);
  });
});
