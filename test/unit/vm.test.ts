// The VM harness on the host. These boot real UML VMs (a few seconds each) — that is the point:
// exit codes, output separation, env/cwd, timeouts and process cleanup must hold for real.
import { beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { ThinimgError } from "../../lib/errors.ts";
import { vmEnv } from "../../lib/vm/env.ts";
import { vmHost } from "../../lib/vm/host.ts";
import { buildInitScript, parseResult, shQuote } from "../../lib/vm/init.ts";
import { runInVm, VmError, type VmResult, vmProcessesLeft } from "../../lib/vm/uml.ts";
import { splitArgs } from "../../scripts/vm.ts";

// generous: on a loaded 2-core box with several VMs booting at once a boot can take 30 s+
const VM_TEST_MS = 180_000;

function children(ppid: number): number[] {
  return readdirSync("/proc")
    .filter((x) => /^\d+$/.test(x))
    .filter((x) => {
      try {
        const s = readFileSync(`/proc/${x}/stat`, "latin1");
        return Number(s.slice(s.lastIndexOf(")") + 2).split(" ")[1]) === ppid;
      } catch {
        return false;
      }
    })
    .map(Number);
}

/** Start scripts/vm.ts running `echo ready; sleep 600`; resolve once "ready" arrived, with linux.uml's pid. */
async function startSleepingVm(extra: string[] = []) {
  const p = Bun.spawn(["bun", "scripts/vm.ts", ...extra, "--", "sh", "-c", "echo ready; exec sleep 600"], { stdout: "pipe", stderr: "pipe" });
  const reader = (p.stdout as ReadableStream<Uint8Array>).getReader();
  let seen = "";
  while (!seen.includes("ready")) {
    const { value, done } = await reader.read();
    if (done) break;
    seen += new TextDecoder().decode(value);
  }
  const umlPid = children(p.pid).find((c) => readFileSync(`/proc/${c}/cmdline`, "latin1").includes("linux.uml")) ?? 0;
  return { p, seen, umlPid };
}
const KERNEL_NOISE = /device-mapper:|loop: module loaded|reboot:|System halted|Linux version|hostfs/;

describe("pure parts", () => {
  test("env safelist keeps PATH/HOME/THINIMG_*/AWS_*/S3_*/CI/TERM/LANG, drops the rest, forces DM_DISABLE_UDEV", () => {
    const e = vmEnv({
      PATH: "/opt/bun/bin:/usr/bin",
      HOME: "/home/x",
      THINIMG_POOL: "p",
      AWS_REGION: "eu",
      S3_ENDPOINT: "http://x",
      CI: "1",
      TERM: "xterm",
      LANG: "C.UTF-8",
      SECRET_Y: "no",
      SSH_AUTH_SOCK: "/tmp/agent",
      GITHUB_TOKEN: "t",
      DM_DISABLE_UDEV: "0",
    });
    expect(Object.keys(e).sort()).toEqual(["AWS_REGION", "CI", "DM_DISABLE_UDEV", "HOME", "LANG", "PATH", "S3_ENDPOINT", "TERM", "THINIMG_POOL"].sort());
    expect(e.DM_DISABLE_UDEV).toBe("1");
    // host PATH first (bun may live in ~/.bun/bin), sbin dirs appended for dmsetup/losetup
    expect(e.PATH!.startsWith("/opt/bun/bin:/usr/bin:")).toBe(true);
    expect(e.PATH!.split(":")).toContain("/usr/sbin");
  });

  test("shQuote survives quotes, spaces, newlines, $ and backslashes", async () => {
    const nasty = `it's "a" $HOME \`x\` \\ \n end`;
    const r = Bun.spawnSync(["sh", "-c", `printf %s ${shQuote(nasty)}`]);
    expect(r.stdout.toString()).toBe(nasty);
  });

  test("init script loads every module in dependency order and records rc", () => {
    const s = buildInitScript({ runDir: "/tmp/r", argv: ["echo", "a b"], env: { A: "1" }, cwd: "/w", driversDir: "/m", insmod: "/usr/sbin/insmod" });
    const order = ["loop", "dm-mod", "dm-bufio", "dm-persistent-data", "dm-bio-prison", "dm-thin-pool", "dm-flakey", "dm-delay"].map((m) =>
      s.indexOf(`/${m}.ko`),
    );
    expect(order.every((i) => i > 0)).toBe(true);
    expect([...order].sort((a, b) => a - b)).toEqual(order);
    expect(s).toContain("max_loop=64");
    expect(s).toContain(`'echo' 'a b'`);
  });

  test("result marker parsing", () => {
    expect(parseResult("rc 3\n")).toEqual({ kind: "rc", exitCode: 3 });
    expect(parseResult("setup-failed insmod x failed")).toEqual({ kind: "setup-failed", message: "insmod x failed" });
    expect(parseResult(null)).toEqual({ kind: "none" });
    expect(parseResult("garbage")).toEqual({ kind: "none" });
  });

  test("missing user-mode-linux / kmod is named with the install command", () => {
    const miss = (probe: Parameters<typeof vmHost>[0]) => {
      try {
        vmHost(probe);
      } catch (e) {
        return e as ThinimgError;
      }
      throw new Error("vmHost did not throw");
    };
    const noUml = miss({ which: () => null });
    expect(noUml).toBeInstanceOf(ThinimgError);
    expect(noUml.kind).toBe("missing");
    expect(noUml.oneLine()).toContain("user-mode-linux");
    expect(noUml.oneLine()).toContain("apt-get install -y user-mode-linux kmod");
    const noKmod = miss({ exists: (p) => !p.endsWith("/insmod") });
    expect(noKmod.oneLine()).toContain("kmod");
    expect(noKmod.oneLine()).toContain("apt-get install");
  });

  test("vm.ts argument split: our flags, then the command (with or without --)", () => {
    expect(splitArgs(["--mem", "512M", "--", "sh", "-c", "x"])).toEqual({ own: ["--mem", "512M"], command: ["sh", "-c", "x"] });
    expect(splitArgs(["sh", "-c", "x --mem 1G"])).toEqual({ own: [], command: ["sh", "-c", "x --mem 1G"] });
    expect(splitArgs(["-v", "--timeout", "5", "ls", "--help"])).toEqual({ own: ["-v", "--timeout", "5"], command: ["ls", "--help"] });
  });
});

describe("real VM", () => {
  let dir: string;
  let r: VmResult;

  beforeAll(async () => {
    dir = mkdtempSync("/tmp/thinimg-vmtest-");
    writeFileSync(`${dir}/from-host`, "host-data\n");
    r = await runInVm({
      argv: [
        "sh",
        "-c",
        // biome-ignore lint/suspicious/noTemplateCurlyInString: shell parameter expansion, not JS
        'echo out-line; echo err-line >&2; echo "x=${THINIMG_X-unset} y=${SECRET_Y-unset} udev=$DM_DISABLE_UDEV"; pwd; cat from-host; echo vm-data > from-vm; echo "$1|$2"; exit 3',
        "sh",
        'it\'s a "quoted" arg',
        "$HOME",
      ],
      env: { PATH: process.env.PATH, THINIMG_X: "carried", SECRET_Y: "leaked" },
      cwd: dir,
      timeoutMs: 150_000,
    });
  }, VM_TEST_MS);

  test("the command's exit code comes back", () => {
    expect(r.timedOut).toBe(false);
    expect(r.exitCode).toBe(3);
  });

  test("stdout and stderr are separate and free of kernel messages", () => {
    expect(r.stderr).toBe("err-line\n");
    expect(r.stdout.split("\n")[0]).toBe("out-line");
    expect(r.stdout).not.toContain("err-line");
    expect(r.stdout).not.toMatch(KERNEL_NOISE);
    expect(r.stderr).not.toMatch(KERNEL_NOISE);
    // …while the kernel did talk (on the console, which goes to the kernel log)
    expect(r.kernelLog).toMatch(/System halted|reboot/);
  });

  test("env safelist: THINIMG_X carried, SECRET_Y not, DM_DISABLE_UDEV=1", () => {
    expect(r.stdout).toContain("x=carried y=unset udev=1\n");
  });

  test("cwd is carried and host files are shared both ways", () => {
    expect(r.stdout).toContain(`\n${dir}\nhost-data\n`);
    expect(readFileSync(`${dir}/from-vm`, "utf8")).toBe("vm-data\n");
  });

  test("arguments arrive byte-exact (no shell re-parsing)", () => {
    expect(r.stdout).toContain(`it's a "quoted" arg|$HOME\n`);
  });

  test("run directory is removed afterwards", () => {
    expect(readdirSync("/tmp")).not.toContain(r.runDir.slice(5));
    rmSync(dir, { recursive: true, force: true });
  });

  test.concurrent(
    "a VM that cannot boot is an error (VmError, exit 125) with the kernel log, not a silent pass",
    async () => {
      let err: unknown;
      await runInVm({ argv: ["true"], kernelArgs: ["rootfstype=ext4", "root=/dev/nosuch"], timeoutMs: 150_000 }).catch((e) => {
        err = e;
      });
      expect(err).toBeInstanceOf(VmError);
      const e = err as VmError;
      expect(e.exitCode).toBe(125);
      expect(e.message).toContain("VM did not boot");
      expect(e.kernelLog).toMatch(/Kernel panic|VFS: Unable to mount root/);
    },
    VM_TEST_MS,
  );

  test.concurrent(
    "timeout kills the VM and leaves no UML process behind",
    async () => {
      const t0 = performance.now();
      const t = await runInVm({ argv: ["sh", "-c", "echo started; exec sleep 600"], timeoutMs: 15_000 });
      expect(t.timedOut).toBe(true);
      expect(t.exitCode).toBeNull();
      // output produced before the kill is kept (on a loaded box the VM may not have got that far)
      expect(["", "started\n"]).toContain(t.stdout);
      expect(performance.now() - t0).toBeLessThan(25_000);
      expect(t.processGroups.length).toBe(1);
      expect(vmProcessesLeft(t.processGroups)).toEqual([]);
    },
    VM_TEST_MS,
  );

  test.concurrent(
    "two VMs at once, each with real dm-thin (dmsetup targets lists thin-pool)",
    async () => {
      const cmd = (tag: string) =>
        runInVm({ argv: ["sh", "-c", `dmsetup targets; ls /dev/mapper/control; echo ${tag}; cat /proc/sys/kernel/hostname`], timeoutMs: 150_000 });
      const t0 = performance.now();
      const [a, b] = await Promise.all([cmd("vm-a"), cmd("vm-b")]);
      const wall = performance.now() - t0;
      for (const [x, tag] of [
        [a, "vm-a"],
        [b, "vm-b"],
      ] as const) {
        expect(x.exitCode).toBe(0);
        expect(x.stdout).toMatch(/^thin-pool\s+v\d/m);
        expect(x.stdout).toMatch(/^thin\s+v\d/m);
        expect(x.stdout).toMatch(/^flakey\s+v\d/m);
        expect(x.stdout).toMatch(/^delay\s+v\d/m);
        expect(x.stdout).toContain(`/dev/mapper/control\n${tag}\nthinimg-vm\n`);
      }
      expect(a.runDir).not.toBe(b.runDir);
      // they overlapped: together they took less wall time than one after the other
      expect(wall).toBeLessThan(a.durationMs + b.durationMs);
    },
    VM_TEST_MS,
  );

  test.concurrent(
    "Ctrl-C on scripts/vm.ts powers the VM off (exit 130, no UML left)",
    async () => {
      const { p, seen, umlPid } = await startSleepingVm();
      expect(seen).toBe("ready\n");
      expect(umlPid).toBeGreaterThan(0);
      expect(vmProcessesLeft([umlPid]).length).toBeGreaterThan(2);
      p.kill("SIGINT");
      expect(await p.exited).toBe(130);
      expect(vmProcessesLeft([umlPid])).toEqual([]);
    },
    VM_TEST_MS,
  );

  test.concurrent(
    "if the caller is SIGKILLed, the watchdog still powers the VM off after its limit",
    async () => {
      const t0 = performance.now();
      // vm.ts's own limit must outlast a slow boot on a loaded machine (the unit tests run concurrently
      // with other VMs booting): a VM that vm.ts powered off itself before our SIGKILL would prove
      // nothing about the watchdog. So wait for the command inside to run, then kill.
      const limitS = 45;
      const { p, seen, umlPid } = await startSleepingVm(["--timeout", String(limitS)]);
      expect(seen).toBe("ready\n");
      expect(umlPid).toBeGreaterThan(0);
      p.kill("SIGKILL"); // no handlers run, nothing cleans up but the watchdog
      await p.exited;
      const killedAt = performance.now() - t0;
      expect(killedAt).toBeLessThan(limitS * 1000);
      expect(vmProcessesLeft([umlPid]).length).toBeGreaterThan(0);
      // limit + 10 s grace from the start, then some slack for a loaded machine
      while (vmProcessesLeft([umlPid]).length > 0 && performance.now() - t0 < (limitS + 35) * 1000) await Bun.sleep(250);
      const left = vmProcessesLeft([umlPid]).map((x) => ({ ...x, cmd: readFileSync(`/proc/${x.pid}/cmdline`, "latin1").slice(0, 60) }));
      expect(left).toEqual([]);
      expect(performance.now() - t0).toBeGreaterThan((limitS + 9) * 1000); // it was the watchdog
    },
    VM_TEST_MS,
  );
});
