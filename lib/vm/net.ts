// A point-to-point link between the host and one test VM: a tap device on the host, seen by the
// guest as `vec0` (UML's vector driver, which batches packets: several times the throughput of the
// older tuntap transport). Benchmarks use it to keep a server (S3) off the guest's only CPU, as it is
// in production: another machine. Needs root and /dev/net/tun; the tap is the caller's to close.
import { existsSync } from "node:fs";
import { ThinimgError } from "../errors.ts";
import { runOk } from "../exec.ts";

export interface VmNet {
  /** The host side's interface name. */
  tap: string;
  /** Host and guest addresses of the /30. */
  hostAddr: string;
  guestAddr: string;
  /** Pass to runInVm's kernelArgs. */
  kernelArgs: string[];
  /** The guest's commands to bring its side up (run inside the VM). */
  guestSetup: string[][];
  close(): Promise<void>;
}

/** A /30 and a tap name from the PID, so concurrent benchmark processes do not collide. */
function vmNetFor(pid: number): Omit<VmNet, "close"> {
  const n = pid % (256 * 64);
  const addr = (k: number) => `10.213.${n >> 6}.${((n & 63) << 2) + k}`;
  const tap = `thinimg${n}`;
  const guestAddr = addr(2);
  return {
    tap,
    hostAddr: addr(1),
    guestAddr,
    kernelArgs: [`vec0:transport=tap,ifname=${tap},depth=128,gro=1`],
    guestSetup: [
      ["ip", "link", "set", "vec0", "up"],
      ["ip", "addr", "add", `${guestAddr}/30`, "dev", "vec0"],
    ],
  };
}

export async function createVmNet(pid = process.pid): Promise<VmNet> {
  if (!existsSync("/dev/net/tun")) {
    throw new ThinimgError("missing", "no /dev/net/tun: a host↔VM link needs the tun driver", {
      hint: "run as root on a host with the tun module (modprobe tun)",
    });
  }
  const n = vmNetFor(pid);
  if (existsSync(`/sys/class/net/${n.tap}`)) await runOk(["ip", "link", "del", n.tap], { timeoutMs: 5_000 }); // a dead run's leftover
  await runOk(["ip", "tuntap", "add", n.tap, "mode", "tap"], { timeoutMs: 5_000 });
  await runOk(["ip", "addr", "add", `${n.hostAddr}/30`, "dev", n.tap], { timeoutMs: 5_000 });
  await runOk(["ip", "link", "set", n.tap, "up"], { timeoutMs: 5_000 });
  return { ...n, close: async () => void (await runOk(["ip", "link", "del", n.tap], { timeoutMs: 5_000 }).catch(() => {})) };
}
