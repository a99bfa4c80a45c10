// recover-pool: the ADR's manual recovery procedure as code. It brings a loop-backed thin pool back
// from its record (DIR/pool.json) after a reboot or panic, or creates a new one. Rules it never
// breaks: it never overwrites a backing file, never reloads or removes a live pool, never loads a
// pool whose metadata failed thin_check (unless --repair rebuilt it), never leaves the pool
// suspended, and on an error it stops where it is (fail dumb) and says what to run next.
import { existsSync, mkdirSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { loadConfig } from "../config.ts";
import * as dmsetup from "../dm/dmsetup.ts";
import { isDmError } from "../dm/errors.ts";
import { assertFreeSpace, DATA_FILE, META_FILE, makeBackingFile, sizeEmptyBackingFile } from "../dm/loop-pool.ts";
import * as losetup from "../dm/losetup.ts";
import { parsePoolTable, poolStatus, poolTable } from "../dm/pool.ts";
import * as thintools from "../dm/thintools.ts";
import { udevArgs } from "../dm/udev.ts";
import { assertDevPath, assertDmName } from "../dm/validate.ts";
import { fromErrno, ThinimgError } from "../errors.ts";
import { run, which } from "../exec.ts";
import { formatBytes } from "../util/units.ts";
import { type GrowRequest, growPool } from "./grow.ts";
import { type DirLock, lockDir } from "./lock.ts";
import { fileId, loopsOf, metaTimeoutMs, sameFeatures, superblockBlank, toolReason } from "./observe.ts";
import { type CreateSpec, newRecord, type PoolRecord, readRecord, recordPath, validateCreateSpec, writeRecord } from "./record.ts";
import { type RepairContext, repairMetadata, repairPlan } from "./repair.ts";
import { type RecoverAction, type RecoverReport, type StatusJson, statusJson } from "./report.ts";
import { Blocked, Runbook, shellLine, sizeFileShell } from "./runbook.ts";

export type { RecoverReport } from "./report.ts";

/** Size of the file at p; 0 when it is absent too (both mean "still to be made"). */
function fileSize(p: string): number {
  try {
    return statSync(p).size;
  } catch {
    return 0;
  }
}

export interface RecoverOptions {
  dir: string;
  /** --pool: the name to create, or (recover) an assertion that the record names this pool. */
  pool?: string | undefined;
  dryRun?: boolean;
  /** Permission to run thin_repair when thin_check fails. */
  repair?: boolean;
  /** For a repair whose superblock is destroyed: the pool's last transaction id (default: the record's). */
  transactionId?: number | undefined;
  /** Present with --create. */
  create?: CreateSpec | undefined;
  /** --grow-data / --grow-meta. */
  grow?: GrowRequest | undefined;
  /** System facts, replaceable in unit tests. */
  probe?: Partial<Probe>;
}

export interface Probe {
  which(cmd: string): string | null;
  now(): Date;
}

const realProbe: Probe = { which, now: () => new Date() };

export const TOOL_PACKAGES: Record<string, string> = {
  dmsetup: "dmsetup",
  losetup: "mount", // util-linux's losetup ships in Debian's "mount" package
  thin_check: "thin-provisioning-tools",
  thin_repair: "thin-provisioning-tools",
};

export function dmArgv(...args: string[]): { argv: string[]; env: Record<string, string> } {
  const u = udevArgs();
  return { argv: ["dmsetup", ...u.flags, ...args], env: u.env };
}

export class Recovery {
  readonly rb: Runbook;
  readonly probe: Probe;
  readonly dir: string;
  pool: string | null = null;
  action: RecoverAction = "blocked";
  status: StatusJson | null = null;
  devices: { metadata: string | null; data: string | null } = { metadata: null, data: null };
  lock: DirLock | null = null;

  constructor(readonly o: RecoverOptions) {
    this.rb = new Runbook(o.dryRun === true);
    this.probe = { ...realProbe, ...o.probe };
    this.dir = resolve(o.dir);
  }

  recoverCommand(): string {
    return shellLine(["bun", "ops/recover-pool.ts", "--dir", this.dir, ...(this.pool ? ["--pool", this.pool] : [])]);
  }

  async preflight(): Promise<void> {
    const tools = ["dmsetup", "losetup", "thin_check", ...(this.o.repair ? ["thin_repair"] : [])];
    for (const t of tools) {
      if (!this.probe.which(t)) {
        throw new ThinimgError("missing", `${t} is not installed (not on PATH)`, {
          hint: `install it: apt-get install -y ${TOOL_PACKAGES[t]} (or bash scripts/setup.sh)`,
        });
      }
    }
    // /dev/mapper/control can exist without a driver behind it (dmsetup creates the node): ask the kernel.
    const v = dmArgv("version");
    const r = await run(v.argv, { timeoutMs: 10_000, env: v.env });
    if (r.timedOut || r.exitCode !== 0) {
      const why = r.stderr.split("\n").find((l) => l.trim()) ?? `exit ${r.exitCode}`;
      throw new ThinimgError("missing", `device-mapper is not available in this kernel (dmsetup version: ${why.trim()})`, {
        hint: "load it: modprobe dm-thin-pool (for tests, run inside the VM: bun scripts/vm.ts -- …)",
      });
    }
    this.rb.note("preflight", `${tools.join(", ")} present; device-mapper available`);
  }

  /** --create: record first (state "creating"), then the rest is the same as a recovery. */
  async create(s: Required<CreateSpec>): Promise<void> {
    const name = loadConfig({ pool: this.o.pool }).pool;
    this.pool = name;
    const dirExists = existsSync(this.dir);
    if (dirExists && !statSync(this.dir).isDirectory()) {
      throw new ThinimgError("input", `${this.dir} exists and is not a directory`, { hint: "choose another --dir" });
    }
    if (!dirExists) {
      await this.rb.act("mkdir", `create ${this.dir}`, { argv: ["mkdir", "-p", this.dir], planned: undefined }, () => {
        mkdirSync(this.dir, { recursive: true, mode: 0o750 });
      });
    }
    this.takeLock("recover-pool --create");
    const existing = dirExists ? readRecord(this.dir) : null;
    const wanted = newRecord(name, s, this.probe.now());
    let rec: PoolRecord;
    if (existing) {
      if (existing.state === "ready") {
        throw new Blocked(
          "conflict",
          `${this.dir} already holds pool ${existing.pool} (created ${existing.created_at}); refusing to create over it`,
          "to bring that pool back, run without --create",
          [shellLine(["bun", "ops/recover-pool.ts", "--dir", this.dir])],
        );
      }
      const same =
        existing.pool === wanted.pool &&
        existing.meta_size === wanted.meta_size &&
        existing.data_size === wanted.data_size &&
        existing.block_size === wanted.block_size &&
        sameFeatures(existing.features, wanted.features);
      if (!same) {
        throw new Blocked(
          "conflict",
          `${this.dir} holds an interrupted --create of pool ${existing.pool} (data ${formatBytes(existing.data_size)}, metadata ${formatBytes(existing.meta_size)}, block ${formatBytes(existing.block_size)}) with other parameters`,
          "finish it with the recorded parameters (run without --create), or, if nothing there matters, empty the directory and create again",
          [shellLine(["bun", "ops/recover-pool.ts", "--dir", this.dir])],
        );
      }
      this.rb.note("read-record", `${recordPath(this.dir)}: interrupted --create of pool ${existing.pool}; continuing it`);
      rec = existing;
    } else {
      for (const f of [wanted.meta_file, wanted.data_file]) {
        const p = join(this.dir, f);
        if (existsSync(p)) {
          throw new Blocked(
            "conflict",
            `${p} already exists and ${recordPath(this.dir)} does not: refusing to overwrite a backing file`,
            "if it is a pool's file, restore its pool.json (docs/ops-recover-pool.md, 'Record missing'); otherwise choose another --dir",
          );
        }
      }
      if (await dmsetup.info(name)) {
        throw new Blocked(
          "conflict",
          `a device-mapper device named ${name} already exists`,
          "choose another --pool, or bring that pool back from its own directory (without --create)",
          [shellLine(["dmsetup", "table", name])],
        );
      }
      rec = wanted;
      // Before anything is written: a pool bigger than the free space would fail under its users.
      assertFreeSpace(this.dir, rec.meta_size + rec.data_size, `${rec.meta_file} and ${rec.data_file}`);
      await this.rb.act(
        "write-record",
        `record the pool's parameters in ${recordPath(this.dir)} (state creating) before any file or device exists`,
        { planned: undefined },
        () => writeRecord(this.dir, rec),
      );
    }
    await this.bringUp(rec);
  }

  /** One run per directory; a dry run changes nothing and takes no lock. */
  takeLock(command: string): void {
    if (!this.rb.dryRun && !this.lock) this.lock = lockDir(this.dir, command);
  }

  /** Without --create: the record must be there. */
  loadRecord(): PoolRecord {
    if (!existsSync(this.dir)) {
      throw new ThinimgError("missing", `pool directory ${this.dir} does not exist`, {
        hint: "check --dir (and that the filesystem holding it is mounted); to make a new pool use --create",
      });
    }
    if (!statSync(this.dir).isDirectory()) throw new ThinimgError("input", `${this.dir} is not a directory`, { hint: "check --dir" });
    this.takeLock("recover-pool");
    const rec = readRecord(this.dir);
    if (!rec) {
      const present = [META_FILE, DATA_FILE].filter((f) => existsSync(join(this.dir, f)));
      const files = present.length ? `${present.join(" and ")} exist${present.length === 1 ? "s" : ""} there` : "no backing files exist there either";
      throw new ThinimgError("missing", `no pool record ${recordPath(this.dir)} (${files})`, {
        hint: present.length
          ? "recover-pool rebuilds a pool only from its record: restore pool.json from a backup (docs/ops-recover-pool.md, 'Record missing')"
          : "nothing to recover here; to make a new pool use --create --data-size … --meta-size …",
      });
    }
    if (this.o.pool !== undefined && this.o.pool !== rec.pool) {
      throw new ThinimgError("conflict", `${recordPath(this.dir)} is for pool ${rec.pool}, not ${this.o.pool}`, {
        hint: `drop --pool or use --pool ${rec.pool}; or point --dir at ${this.o.pool}'s directory`,
      });
    }
    this.pool = rec.pool;
    this.rb.note(
      "read-record",
      `${recordPath(this.dir)}: pool ${rec.pool}, state ${rec.state}, data ${formatBytes(rec.data_size)}, metadata ${formatBytes(rec.meta_size)}, block ${formatBytes(rec.block_size)}`,
    );
    return rec;
  }

  async ensureFiles(rec: PoolRecord): Promise<void> {
    const creating = rec.state === "creating";
    if (creating) {
      // an interrupted --create: the files still to make (or size) must fit, all of them, up front
      const todo = (
        [
          [rec.meta_file, rec.meta_size],
          [rec.data_file, rec.data_size],
        ] as const
      ).filter(([f]) => fileSize(join(this.dir, f)) === 0);
      if (todo.length > 0) {
        assertFreeSpace(
          this.dir,
          todo.reduce((n, [, size]) => n + size, 0),
          todo.map(([f]) => f).join(" and "),
        );
      }
    }
    for (const [role, file, size] of [
      ["metadata", rec.meta_file, rec.meta_size],
      ["data", rec.data_file, rec.data_size],
    ] as const) {
      const p = join(this.dir, file);
      let st: ReturnType<typeof statSync> | null = null;
      try {
        st = statSync(p);
      } catch {}
      if (!st) {
        if (!creating) {
          throw new ThinimgError("missing", `${role} backing file ${p} is missing (pool ${rec.pool})`, {
            hint: "restore it (mount the filesystem that holds it, or from a backup); recover-pool never recreates the files of a pool that was in use",
          });
        }
        await this.rb.act(
          "create-file",
          `new ${role} file ${p} (${formatBytes(size)}; fallocate, or truncate where unsupported)`,
          {
            argv: ["fallocate", "-l", String(size), p],
            shell: sizeFileShell(size, p),
            planned: undefined,
            done: (how) => `${p}: ${formatBytes(size)} via ${how}`,
          },
          () => makeBackingFile(p, size),
        );
        continue;
      }
      if (!st.isFile()) throw new ThinimgError("input", `${role} backing file ${p} is not a regular file`, { hint: "restore the file" });
      if (st.size !== size) {
        if (creating && st.size === 0) {
          // an interrupted --create: fallocate made the file but died before sizing it; it holds nothing
          await this.rb.act(
            "size-file",
            `size the empty ${role} file ${p} left by an interrupted --create to ${formatBytes(size)}`,
            {
              argv: ["fallocate", "-l", String(size), p],
              shell: sizeFileShell(size, p),
              planned: undefined,
              done: (how) => `${p}: ${formatBytes(size)} via ${how}`,
            },
            () => sizeEmptyBackingFile(p, size),
          );
          continue;
        }
        throw new ThinimgError("conflict", `${role} backing file ${p} is ${st.size} bytes; the record says ${size}`, {
          hint: creating
            ? `it was left by an interrupted --create and holds no pool data: remove it (rm ${p}) and re-run`
            : "it was changed outside recover-pool (resizing is not supported): restore it, or fix the record",
        });
      }
    }
    this.rb.note("check-files", `${rec.meta_file} and ${rec.data_file} present with the recorded sizes`);
  }

  async bringUp(rec: PoolRecord): Promise<void> {
    const name = rec.pool;
    await this.ensureFiles(rec);
    const metaPath = join(this.dir, rec.meta_file);
    const dataPath = join(this.dir, rec.data_file);
    const loops = await losetup.listDetailed({ pool_name: name });
    const metaLoops = loopsOf(loops, fileId(metaPath));
    const dataLoops = loopsOf(loops, fileId(dataPath));
    const info = await dmsetup.info(name);
    if (info) return this.whenActive(rec, info, loops, metaLoops, dataLoops);
    return this.whenInactive(rec, metaLoops, dataLoops);
  }

  describeDev(majMin: string, loops: losetup.LoopDetail[]): string {
    const l = loops.find((x) => x.majMin === majMin);
    return l ? `${majMin} (${l.device} → ${l.backingFile}${l.deleted ? " (deleted)" : ""})` : majMin;
  }

  async whenActive(
    rec: PoolRecord,
    info: dmsetup.DmInfo,
    loops: losetup.LoopDetail[],
    metaLoops: losetup.LoopDetail[],
    dataLoops: losetup.LoopDetail[],
  ): Promise<void> {
    const name = rec.pool;
    const inspect = [shellLine(["dmsetup", "info", name]), shellLine(["dmsetup", "table", name]), shellLine(["losetup", "--list"])];
    if (!info.live) {
      throw new Blocked(
        "conflict",
        `device ${name} exists but has no live table`,
        "if it is a leftover of an interrupted run, remove it (dmsetup remove) and re-run; recover-pool never loads a table into an existing device",
        [...inspect, shellLine(["dmsetup", "table", "--inactive", name])],
      );
    }
    const text = await dmsetup.table(name);
    const lines = text.split("\n").filter((l) => l.trim());
    let t: ReturnType<typeof parsePoolTable>;
    try {
      if (lines.length !== 1) throw new Error("several targets");
      t = parsePoolTable(lines[0]!);
    } catch {
      throw new Blocked(
        "conflict",
        `device ${name} is active but is not a thin-pool (table: ${lines.join(" | ")})`,
        "another device uses this name; choose another --pool",
        inspect,
      );
    }
    const diffs: string[] = [];
    if (!metaLoops.some((l) => l.majMin === t.metaDev)) {
      diffs.push(`metadata device is ${this.describeDev(t.metaDev, loops)}, not a loop of ${join(this.dir, rec.meta_file)}`);
    }
    if (!dataLoops.some((l) => l.majMin === t.dataDev)) {
      diffs.push(`data device is ${this.describeDev(t.dataDev, loops)}, not a loop of ${join(this.dir, rec.data_file)}`);
    }
    if (t.dataSectors !== rec.data_sectors) diffs.push(`length ${t.dataSectors} sectors, recorded ${rec.data_sectors}`);
    if (t.blockSectors !== rec.block_sectors) diffs.push(`block size ${t.blockSectors} sectors, recorded ${rec.block_sectors}`);
    if (t.lowWaterMark !== rec.low_water_mark) diffs.push(`low water mark ${t.lowWaterMark}, recorded ${rec.low_water_mark}`);
    if (!sameFeatures(t.features, rec.features)) diffs.push(`features [${t.features.join(" ")}], recorded [${rec.features.join(" ")}]`);
    if (diffs.length) {
      throw new Blocked(
        "conflict",
        `pool ${name} is active with a different table: ${diffs.join("; ")}`,
        "recover-pool never reloads a live pool. If --dir is the wrong directory, use the right one; otherwise stop what uses the pool, remove its thin devices and the pool (dmsetup remove, no --force) and re-run",
        inspect,
      );
    }
    if (info.inactive) {
      throw new Blocked(
        "conflict",
        `pool ${name} has an inactive table loaded (a reload that was never resumed); a resume would swap it in`,
        "inspect it and drop it with dmsetup clear, then re-run",
        [shellLine(["dmsetup", "table", "--inactive", name]), shellLine(["dmsetup", "clear", name]), this.recoverCommand()],
      );
    }
    const metaDev = metaLoops.find((l) => l.majMin === t.metaDev)!.device;
    const dataDev = dataLoops.find((l) => l.majMin === t.dataDev)!.device;
    this.devices = { metadata: metaDev, data: dataDev };
    this.rb.note("pool-active", `${name} is active with the recorded table (metadata ${metaDev}, data ${dataDev})`, "ok", ["dmsetup", "table", name]);
    let changed = false;
    if (info.state === "SUSPENDED") {
      const d = dmArgv("resume", name);
      await this.rb.act("resume-pool", `${name} was left suspended: resume it`, { ...d, planned: undefined }, () => dmsetup.resume(name));
      changed = true;
    }
    await this.verify(rec, true); // status reads fine on a suspended device
    // A healthy pool changes nothing, not even the record.
    if (rec.state === "creating" || changed) await this.markReady(rec);
    this.action = rec.state === "creating" ? "created" : changed ? "recovered" : "healthy";
  }

  async whenInactive(rec: PoolRecord, metaLoops: losetup.LoopDetail[], dataLoops: losetup.LoopDetail[]): Promise<void> {
    const name = rec.pool;
    // The files must not be under another pool (this one active under another name): loading a
    // second pool on the same metadata would destroy it.
    const ours = new Map<string, string>();
    for (const l of metaLoops) ours.set(l.majMin, rec.meta_file);
    for (const l of dataLoops) ours.set(l.majMin, rec.data_file);
    if (ours.size) {
      for (const p of await dmsetup.ls("thin-pool")) {
        const tl = (await dmsetup.table(p.name)).split("\n")[0] ?? "";
        let t: ReturnType<typeof parsePoolTable>;
        try {
          t = parsePoolTable(tl);
        } catch {
          continue;
        }
        const hit = ours.get(t.metaDev) ?? ours.get(t.dataDev);
        if (hit) {
          throw new Blocked(
            "conflict",
            `${join(this.dir, hit)} is in use by the active pool ${p.name} (the record names ${name})`,
            `this directory's pool is active under another name; use that pool, or deactivate it first — never load the same files twice`,
            [shellLine(["dmsetup", "table", p.name]), shellLine(["losetup", "--list"])],
          );
        }
      }
    }
    const metaDev = await this.loopFor("metadata", join(this.dir, rec.meta_file), metaLoops, "META_DEV", name);
    const dataDev = await this.loopFor("data", join(this.dir, rec.data_file), dataLoops, "DATA_DEV", name);
    this.devices = { metadata: metaDev, data: dataDev };
    const checkedMeta = await this.checkMetadata(rec, metaDev);
    this.devices.metadata = checkedMeta;
    const table = this.tableFor(rec, checkedMeta, dataDev);
    const d = dmArgv("create", name, "--table", table);
    try {
      await this.rb.act("create-pool", `load pool ${name} from the record`, { ...d, planned: undefined }, () =>
        dmsetup.create(name, table, { ctx: { pool_name: name } }),
      );
    } catch (e) {
      if (isDmError(e, "exists")) {
        throw new Blocked("conflict", `device ${name} appeared while recovering (another process?)`, "re-run recover-pool to check it", [
          this.recoverCommand(),
        ]);
      }
      const msg = e instanceof ThinimgError ? e.message : String(e);
      throw new Blocked(
        "dm",
        `loading pool ${name} failed: ${msg}`,
        "nothing was removed. Check `dmesg | tail` for device-mapper errors; 'unknown target type' means dm-thin-pool is not loaded (modprobe dm-thin-pool)",
        ["dmesg | tail -20", this.recoverCommand()],
      );
    }
    await this.verify(rec, !this.rb.dryRun);
    await this.markReady(rec);
    this.action = rec.state === "creating" ? "created" : "recovered";
  }

  tableFor(rec: PoolRecord, metaDev: string, dataDev: string): string {
    const p = {
      metaDev,
      dataDev,
      dataSectors: rec.data_sectors,
      blockSectors: rec.block_sectors,
      lowWaterMark: rec.low_water_mark,
      features: rec.features,
    };
    if (!metaDev.startsWith("$") && !dataDev.startsWith("$")) return poolTable(p);
    // dry run: devices not attached yet stay shell variables
    return `0 ${p.dataSectors} thin-pool ${metaDev} ${dataDev} ${p.blockSectors} ${p.lowWaterMark} ${p.features.length}${p.features.map((f) => ` ${f}`).join("")}`;
  }

  async loopFor(role: string, path: string, found: losetup.LoopDetail[], variable: string, pool: string): Promise<string> {
    const usable = found.filter((l) => !l.readOnly);
    if (usable.length) {
      const extra =
        usable.length > 1
          ? ` (also attached on ${usable
              .slice(1)
              .map((l) => l.device)
              .join(", ")}; left alone)`
          : "";
      this.rb.note("reuse-loop", `${role} file already attached on ${usable[0]!.device}${extra}`);
      return usable[0]!.device;
    }
    if (found.length) {
      throw new Blocked(
        "conflict",
        `${path} is attached read-only on ${found.map((l) => l.device).join(", ")}; the pool needs it writable`,
        "detach it and re-run",
        [...found.map((l) => shellLine(["losetup", "--detach", l.device])), this.recoverCommand()],
      );
    }
    try {
      return await this.rb.act(
        "attach-loop",
        `attach ${role} file ${path}`,
        { argv: ["losetup", "--find", "--show", path], assign: variable, planned: `$${variable}`, done: (dev) => `${role} file ${path} on ${dev}` },
        () => losetup.attach(path, { ctx: { pool_name: pool } }),
      );
    } catch (e) {
      throw new ThinimgError("dm", `could not attach a loop device to ${path}: ${e instanceof ThinimgError ? e.message : String(e)}`, {
        hint: "check that the loop module is loaded and a loop device is free (losetup --find); nothing else was changed",
      });
    }
  }

  async checkMetadata(rec: PoolRecord, metaDev: string): Promise<string> {
    const metaPath = join(this.dir, rec.meta_file);
    const blank = superblockBlank(metaPath);
    if (blank && rec.state === "creating") {
      this.rb.note("check-metadata", "new pool: the metadata is blank; the kernel formats it when the pool is first loaded", "skipped");
      return metaDev;
    }
    // Dry run with nothing attached: check the file itself (nothing uses it; thin_check only reads),
    // unless the filesystem refuses thin_check's O_DIRECT open (hostfs) — then it is a planned step.
    const target = metaDev.startsWith("$") ? metaPath : metaDev;
    const planned = () => {
      const argv = ["thin_check", "--clear-needs-check-flag", metaDev];
      this.rb.steps.push({
        name: "check-metadata",
        status: "planned",
        argv,
        command: shellLine(argv),
        detail: "thin_check the metadata (this filesystem cannot be checked without a loop device); if it fails the run stops with the repair steps",
      });
      return metaDev;
    };
    // A passing check also clears the superblock's needs_check flag, which would otherwise keep the
    // pool read-only — except in a dry run, which writes nothing.
    const argv = ["thin_check", ...(this.rb.dryRun ? [] : ["--clear-needs-check-flag"]), target];
    const r = await thintools.thinCheck(target, {
      clearNeedsCheck: !this.rb.dryRun,
      timeoutMs: metaTimeoutMs(rec.meta_size),
      ctx: { pool_name: rec.pool },
    });
    if (r.ok) {
      this.rb.note("check-metadata", `thin_check passed on ${target}`, "ok", argv);
      return metaDev;
    }
    if (target === metaPath && /syscall 'open' failed/.test(r.output)) return planned();
    const why = blank
      ? `the metadata superblock of ${metaPath} is all zeros (wiped); loading the pool would format it and lose every thin device`
      : `thin_check failed on ${target}: ${toolReason(r.output) || `exit ${r.exitCode}`}`;
    this.rb.note("check-metadata", why, "failed", argv);
    const rc: RepairContext = { rb: this.rb, dir: this.dir, transactionId: this.o.transactionId, now: this.probe.now() };
    const plan = repairPlan(rc, rec, metaDev);
    if (!this.o.repair) {
      throw new Blocked(
        "unhealthy",
        `metadata of pool ${rec.pool} is damaged: ${why}`,
        "the pool was NOT loaded. Repair it with --repair (thin_repair into a new file, old file kept), or run the next steps by hand",
        plan,
      );
    }
    return repairMetadata(rc, rec, metaDev);
  }

  /** Status must be rw, not needs_check, not Fail/Error. `read` false: dry run before the pool exists. */
  async verify(rec: PoolRecord, read: boolean): Promise<void> {
    const name = rec.pool;
    if (!read) {
      this.rb.steps.push({
        name: "verify-status",
        status: "planned",
        argv: ["dmsetup", "status", name],
        command: shellLine(["dmsetup", "status", name]),
        detail: "expect rw, no needs_check",
      });
      return;
    }
    const s = await poolStatus(name, { ctx: { pool_name: name } });
    this.status = statusJson(s);
    const deactivate = [
      shellLine(["dmsetup", "ls", "--tree"]),
      "# remove every thin device on the pool (dmsetup remove NAME; unmount first), then:",
      shellLine(["dmsetup", "remove", name]),
      this.recoverCommand(),
    ];
    const hint =
      "the pool was left as it is. Stop what uses it, remove its thin devices and the pool (dmsetup remove without --force), then re-run recover-pool: it runs thin_check first";
    if (s.kind === "fail")
      throw new Blocked("unhealthy", `pool ${name} is in Fail mode (the kernel stopped it after a metadata or device error)`, hint, deactivate);
    if (s.kind === "error") throw new Blocked("unhealthy", `pool ${name} reports Error status`, hint, deactivate);
    if (s.needsCheck) throw new Blocked("unhealthy", `pool ${name} has needs_check set: its metadata must be checked`, hint, deactivate);
    if (s.mode === "out_of_data_space") {
      throw new Blocked(
        "unhealthy",
        `pool ${name} is out of data space (${s.dataUsed}/${s.dataTotal} blocks)`,
        "grow the data device (recover-pool --grow-data +SIZE), then free space with `bun scripts/gc.ts --force`",
        [shellLine(["dmsetup", "status", name])],
      );
    }
    if (s.mode !== "rw") throw new Blocked("unhealthy", `pool ${name} is read-only (mode ${s.mode}): the kernel hit a metadata error`, hint, deactivate);
    this.rb.note(
      "verify-status",
      `rw; data ${s.dataUsedPct}% used (${s.dataUsed}/${s.dataTotal} blocks), metadata ${s.metaUsedPct}% used; transaction ${s.transactionId}`,
      "ok",
      ["dmsetup", "status", name],
    );
  }

  /** Record state ready and the transaction id just seen (thin_repair's fallback). */
  async markReady(rec: PoolRecord): Promise<void> {
    const now = this.probe.now().toISOString();
    const txid = this.status?.transaction_id ?? rec.last_transaction_id;
    await this.rb.act(
      "write-record",
      `${rec.state === "creating" ? "mark the pool ready" : "note the transaction id"} in ${recordPath(this.dir)}`,
      { planned: undefined },
      () => writeRecord(this.dir, { ...rec, state: "ready", updated_at: now, last_transaction_id: txid, last_seen_at: now }),
    );
  }

  report(err: ThinimgError | null): RecoverReport {
    return {
      ok: err === null,
      pool: this.pool,
      dir: this.dir,
      action: err ? "blocked" : this.action,
      dry_run: this.rb.dryRun,
      steps: this.rb.steps,
      status: this.status,
      devices: this.devices,
      error: err ? { kind: err.kind, message: err.message, hint: err.hint ?? null } : null,
      next_steps: err instanceof Blocked ? err.nextSteps : [],
      exit_code: err ? err.exitCode : 0,
    };
  }
}

/** Run recover-pool (or --create). Operator-facing failures come back as a "blocked" report;
 * only bugs throw. */
export async function recoverPool(o: RecoverOptions): Promise<RecoverReport> {
  const r = new Recovery(o);
  try {
    assertDevPath(r.dir);
    if (o.pool !== undefined) assertDmName(o.pool, "pool name");
    const spec = o.create ? validateCreateSpec(o.create) : null;
    await r.preflight();
    if (spec) await r.create(spec);
    else {
      const rec = r.loadRecord();
      // a grow interrupted by a crash is finished by whatever run comes next
      if (o.grow || rec.grow) await growPool(r, rec, o.grow);
      else await r.bringUp(rec);
    }
    return r.report(null);
  } catch (e) {
    if (e instanceof ThinimgError) return r.report(e);
    // a read-only or full disk, a missing directory, no permission: the operator's to fix
    const fs = fromErrno(e);
    if (fs) return r.report(fs);
    throw e;
  } finally {
    r.lock?.release();
  }
}
