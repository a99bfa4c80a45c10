// A microVM's disk survives a host reboot and any number of GC runs — from the host: two VM runs are
// two boots of a real kernel on the same files, driven through the CLI exactly as an operator's boot
// runbook and GC timer do. Boot 1: pool, unpack, three snapshots (A: data written into it, the
// microVM's disk; B: later removed by hand; C: released), power off with everything loaded. Boot 2:
// recover-pool without re-attach, two `gc --force` (A and B are detached and kept, C is collected),
// recover-pool again (re-attaches A and B), re-attach again (a no-op), A's data read back; then B's
// device removed by hand: kept until its user releases it, collected after.
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { GcReport } from "../../lib/gc/report.ts";
import type { Inventory } from "../../lib/pipeline/inventory.ts";
import type { ReattachAllReport, ReattachResult } from "../../lib/pipeline/reattach.ts";
import type { RecoverReport } from "../../lib/recover/recover.ts";
import { buildLayerTar, writeLayerFamily } from "../helpers/images.ts";
import { vmBoot } from "../helpers/run.ts";

const B = mkdtempSync("/tmp/thinimg-reboot-reattach-");
afterAll(() => rmSync(B, { recursive: true, force: true }));
const POOL = `rb${process.pid}`;
const SECRET = `written by the microVM ${crypto.randomUUID()}`;

const boot = (script: string) =>
  vmBoot(`export THINIMG_STATE_DIR=${B}/state THINIMG_POOL=${POOL} THINIMG_VIRTUAL_SIZE=256M THINIMG_LOG_LEVEL=error\n${script}`);

const read = (f: string) => readFileSync(join(B, f), "utf8").trim();
const json = <T>(f: string): T => {
  try {
    return JSON.parse(read(f)) as T;
  } catch {
    throw new Error(`${f} is not JSON: ${read(f).slice(0, 2000)}`);
  }
};

test("a reboot never costs an active snapshot its data: detached, kept by GC, re-attached by the boot runbook", async () => {
  writeLayerFamily(join(B, "img"), [
    buildLayerTar([
      { path: "etc/", type: "dir" },
      { path: "etc/os-release", content: "ID=reboot-test\n" },
    ]),
    buildLayerTar([
      { path: "app/", type: "dir" },
      { path: "app/run", content: "#!/bin/sh\necho hi\n", mode: 0o755 },
    ]),
  ]);
  const boot1 = await boot(`set -e
    bun ops/recover-pool.ts --create --dir ${B}/pool --data-size 1G --meta-size 32M --pool ${POOL} > /dev/null
    bun scripts/unpack.ts ${B}/img --name web > /dev/null
    A=$(bun scripts/activate.ts web); B=$(bun scripts/activate.ts web); C=$(bun scripts/activate.ts web)
    echo "$A $B $C" > ${B}/devs
    mkdir -p ${B}/m && mount "$A" ${B}/m && echo "${SECRET}" > ${B}/m/vm-data.txt && sync && umount ${B}/m
    bun scripts/release.ts "$C" > /dev/null
  `);
  expect(boot1.code, `boot 1 failed:\n${boot1.out}\n${boot1.err}`).toBe(0);
  const [devA, devB, devC] = read("devs").split(" ") as [string, string, string];
  const nameOf = (d: string) => d.replace("/dev/mapper/", "");
  // the VM powered off with the pool and snapshots A and B loaded: nothing was torn down

  const boot2 = await boot(`
    run() { out=$1; shift; "$@" > ${B}/$out.json 2> ${B}/$out.err; echo $? > ${B}/$out.rc; }
    run recover1 bun ops/recover-pool.ts --dir ${B}/pool --no-reattach --json
    run list1 bun scripts/list.ts --json
    run gc1 bun scripts/gc.ts --force --grace 0 --json
    run gc2 bun scripts/gc.ts --force --grace 0 --json
    run released bun scripts/activate.ts --snapshot ${devC} --json
    run recover2 bun ops/recover-pool.ts --dir ${B}/pool --json
    run again bun scripts/activate.ts --snapshot ${devA} --json
    mkdir -p ${B}/m && mount -o ro ${devA} ${B}/m && cat ${B}/m/vm-data.txt > ${B}/readback; umount ${B}/m
    dmsetup remove ${nameOf(devB)}
    run list2 bun scripts/list.ts --json
    run gc3 bun scripts/gc.ts --force --grace 0 --json
    run releaseB bun scripts/release.ts ${devB} --json
    run gc4 bun scripts/gc.ts --force --grace 0 --json
    run list3 bun scripts/list.ts --json
  `);
  expect(boot2.code, `boot 2 failed:\n${boot2.out}\n${boot2.err}`).toBe(0);

  // the pool is back; the snapshots are not loaded yet: listed as detached, never as orphans
  expect(read("recover1.rc"), read("recover1.err")).toBe("0");
  expect(json<RecoverReport & { reattach: unknown }>("recover1.json")).toMatchObject({ ok: true, action: "recovered", reattach: null });
  const list1 = json<Inventory>("list1.json");
  expect(list1.snapshots.map((s) => [s.device_name, s.state, s.device_path])).toEqual([
    [nameOf(devA), "detached", null],
    [nameOf(devB), "detached", null],
  ]);

  // GC, twice: the released snapshot's thin id goes; the detached ones are reported and kept
  const gc1 = json<GcReport>("gc1.json");
  const thinOf = (dev: string) => Number(/-snap-(\d+)$/.exec(dev)![1]);
  expect(gc1.detached.map((d) => [d.device, d.thin_id])).toEqual([
    [nameOf(devA), thinOf(devA)],
    [nameOf(devB), thinOf(devB)],
  ]);
  expect(gc1.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[thinOf(devC), "db_released", "done"]]);
  expect(gc1.repairs).toEqual([]);
  expect(gc1.exit_code).toBe(1); // a detached snapshot needs a human (or the boot runbook)
  const gc2 = json<GcReport>("gc2.json");
  expect(gc2.orphans).toEqual([]);
  expect(gc2.detached.map((d) => d.device)).toEqual([nameOf(devA), nameOf(devB)]);

  // a released snapshot is not re-attached
  expect(read("released.rc")).toBe("8");
  expect(read("released.err")).toContain("is released: nothing to re-attach");

  // recover-pool on the healthy pool re-attaches both: same names, same thin ids
  expect(read("recover2.rc"), read("recover2.err")).toBe("0");
  const r2 = json<RecoverReport & { reattach: ReattachAllReport }>("recover2.json");
  expect(r2.action).toBe("healthy");
  expect(r2.reattach.snapshots.map((s) => [s.device_path, s.thin_id, s.outcome])).toEqual([
    [devA, thinOf(devA), "reattached"],
    [devB, thinOf(devB), "reattached"],
  ]);
  expect(read("recover2.err")).toContain("re-attach: 2 active snapshot(s): 2 re-attached");
  // idempotent: a second re-attach finds it loaded with its own table
  expect(read("again.rc"), read("again.err")).toBe("0");
  expect(json<ReattachResult>("again.json")).toMatchObject({ outcome: "already_attached", device_path: devA, thin_id: thinOf(devA) });
  // the microVM's data, across the reboot and two GC runs
  expect(read("readback")).toBe(SECRET);

  // removed by hand: detached again, still kept, until its user releases it
  expect(json<Inventory>("list2.json").snapshots.map((s) => [s.device_name, s.state])).toEqual([
    [nameOf(devA), "active"],
    [nameOf(devB), "detached"],
  ]);
  const gc3 = json<GcReport>("gc3.json");
  expect(gc3.orphans).toEqual([]);
  expect(gc3.detached.map((d) => d.device)).toEqual([nameOf(devB)]);
  expect(read("releaseB.rc"), read("releaseB.err")).toBe("0");
  expect(json<{ state: string }>("releaseB.json").state).toBe("released");
  const gc4 = json<GcReport>("gc4.json");
  expect(gc4.orphans.map((o) => [o.thin_id, o.reason, o.outcome])).toEqual([[thinOf(devB), "db_released", "done"]]);
  expect(gc4.detached).toEqual([]);
  expect(gc4.exit_code).toBe(0);
  expect(json<Inventory>("list3.json").snapshots.map((s) => [s.device_name, s.state])).toEqual([[nameOf(devA), "active"]]);
}, 600_000);
