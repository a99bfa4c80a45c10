// What every pipeline operation needs: config, the open state DB, who we are (lock/work owner), and
// an optional progress sink.
import { useCommandJournal } from "../cmd-journal.ts";
import type { Config } from "../config.ts";
import { withSharedHold } from "../lock/holders.ts";
import { currentHolder } from "../lock/owner.ts";
import { type Db, openDb } from "../store/db.ts";
import type { Owner } from "../store/work.ts";

/** Where an operation reports how far it is (a TTY line in the CLI, a job's progress in the service). */
export interface Progress {
  /** A new stage ("fetch", "layer 2/5: apply"). */
  stage(label: string): void;
  /** Bytes done (and total when known) within the current stage. */
  bytes(done: number, total: number | null): void;
  /** Clear the line (before normal output). */
  done(): void;
}

export interface Ctx {
  cfg: Config;
  db: Db;
  owner: Owner;
  progress?: Progress | undefined;
}

export function makeCtx(cfg: Config, o: { command?: string; progress?: Progress; db?: Db; existing?: boolean } = {}): Ctx {
  const h = currentHolder(o.command);
  useCommandJournal(cfg.stateDir);
  return {
    cfg,
    db: o.db ?? openDb(cfg.dbPath, { existing: o.existing }),
    owner: { pid: h.pid, startTime: h.startTime, host: h.host, command: h.command },
    progress: o.progress,
  };
}

/** Run one pipeline operation as a shared holder of the state dir (gc --force and recover-pool
 * wait for it, and it waits for them); an idle process holds nothing (a service: not once it has
 * been idle for lingerMs). */
export function asHolder<T>(ctx: Ctx, fn: () => Promise<T>, o: { lingerMs?: number } = {}): Promise<T> {
  return withSharedHold(ctx.cfg.stateDir, { waitMs: ctx.cfg.lockWaitMs, command: ctx.owner.command, lingerMs: o.lingerMs }, fn);
}
