// One recover-pool run's state: its options, the runbook it writes, what it learned (the pool, its
// status and devices) and how it ended. Every step of the run is a function of it (create.ts,
// bring-up.ts, …); report() turns it into the command's document.
import { resolve } from "node:path";
import { udevArgs } from "../dm/udev.ts";
import type { ThinimgError } from "../errors.ts";
import { which } from "../exec.ts";
import type { GrowRequest } from "./grow.ts";
import { type DirLock, lockDir } from "./lock.ts";
import type { CreateSpec } from "./record.ts";
import type { RecoverAction, RecoverReport, StatusJson } from "./report.ts";
import { Blocked, Runbook, shellLine } from "./runbook.ts";

export interface RecoverOptions {
  dir: string;
  /** --pool: the name to create, or (recover) an assertion that the record names this pool. */
  pool?: string | undefined;
  /** The configured pool (THINIMG_POOL or the default) a --create without --pool makes. */
  defaultPool?: string | undefined;
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

export function dmArgv(...args: string[]): { argv: string[]; env: Record<string, string> } {
  const u = udevArgs();
  return { argv: ["dmsetup", ...u.flags, ...args], env: u.env };
}

export class RecoverRun {
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

  /** The command that re-runs this recovery (a next step after a block). */
  recoverCommand(): string {
    return shellLine(["bun", "ops/recover-pool.ts", "--dir", this.dir, ...(this.pool ? ["--pool", this.pool] : [])]);
  }

  /** One run per directory; a dry run changes nothing and takes no lock. */
  takeLock(command: string): void {
    if (!this.rb.dryRun && !this.lock) this.lock = lockDir(this.dir, command);
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
