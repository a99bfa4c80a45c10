import { describe, expect, test } from "bun:test";
import { parsePoolStatus, parseThinStatus, StatusParseError } from "../../lib/dm/status.ts";

describe("parsePoolStatus", () => {
  test("healthy pool line as printed by the 6.1 kernel", () => {
    const s = parsePoolStatus("0 2097152 thin-pool 0 425/4096 784/16384 - rw no_discard_passdown error_if_no_space - 1024 ");
    expect(s).toEqual({
      kind: "ok",
      transactionId: 0,
      metaUsed: 425,
      metaTotal: 4096,
      dataUsed: 784,
      dataTotal: 16384,
      heldRoot: null,
      mode: "rw",
      discard: "no_discard_passdown",
      noSpace: "error_if_no_space",
      needsCheck: false,
      metaLowWatermark: 1024,
      dataUsedPct: 4.79,
      metaUsedPct: 10.38,
      lengthSectors: 2097152,
    });
  });

  test("name-prefixed line, held metadata root, out of space, needs_check, queue mode", () => {
    const s = parsePoolStatus("pool: 0 8 thin-pool 7 10/100 100/100 19 out_of_data_space discard_passdown queue_if_no_space needs_check 5");
    if (s.kind !== "ok") throw new Error("expected ok");
    expect(s.transactionId).toBe(7);
    expect(s.heldRoot).toBe(19);
    expect(s.mode).toBe("out_of_data_space");
    expect(s.discard).toBe("discard_passdown");
    expect(s.noSpace).toBe("queue_if_no_space");
    expect(s.needsCheck).toBe(true);
    expect(s.dataUsedPct).toBe(100);
  });

  test("read-only mode and ignore_discard; bare args without target prefix", () => {
    const s = parsePoolStatus("3 1/10 0/10 - ro ignore_discard error_if_no_space - 2");
    expect(s.kind === "ok" && s.mode).toBe("ro");
    expect(s.kind === "ok" && s.discard).toBe("ignore_discard");
    expect(s.kind === "ok" && s.lengthSectors).toBe(null);
  });

  test("Fail and Error forms", () => {
    expect(parsePoolStatus("0 2097152 thin-pool Fail")).toEqual({ kind: "fail" });
    expect(parsePoolStatus("pool: 0 2097152 thin-pool Error")).toEqual({ kind: "error" });
  });

  test("garbage and other targets are rejected, not guessed", () => {
    expect(() => parsePoolStatus("0 100 linear 7:0 0")).toThrow(StatusParseError);
    expect(() => parsePoolStatus("0 10 thin-pool 1 2/3")).toThrow(StatusParseError);
    expect(() => parsePoolStatus("0 10 thin-pool x 1/2 1/2 - rw no_discard_passdown error_if_no_space - 1")).toThrow(/transaction/);
    expect(() => parsePoolStatus("0 10 thin-pool 1 1/2 1/2 - rx no_discard_passdown error_if_no_space - 1")).toThrow(/mode/);
  });
});

describe("parseThinStatus", () => {
  test("mapped and unmapped thin devices, Fail", () => {
    expect(parseThinStatus("snap2: 0 2097152 thin 100352 2097151")).toEqual({
      kind: "ok",
      mappedSectors: 100352,
      highestMappedSector: 2097151,
    });
    expect(parseThinStatus("0 2097152 thin 0 -")).toEqual({ kind: "ok", mappedSectors: 0, highestMappedSector: null });
    expect(parseThinStatus("0 2097152 thin Fail")).toEqual({ kind: "fail" });
    expect(() => parseThinStatus("0 2097152 thin-pool 0 1/2 1/2 - rw")).toThrow(StatusParseError);
  });
});
