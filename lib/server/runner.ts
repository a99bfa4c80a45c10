// The job runner: unpack jobs one at a time through the pipeline (the ADR's unpack queue of 1; the
// pipeline's own locks and dm queue serialize the dm work against activations and other processes).
// The operations are a parameter so unit tests can drive the queue without a kernel.
import { errorMessage, ThinimgError } from "../errors.ts";
import { log } from "../log.ts";
import type { UnpackOptions, UnpackResult } from "../pipeline/unpack.ts";
import type { Ctx, Progress } from "../pool/context.ts";
import { claimNextJob, finishJob, interruptJob, type JobError, type JobRow, listJobs, type UnpackParams } from "./jobs.ts";

export interface JobOps {
  unpack(ctx: Ctx, o: UnpackOptions): Promise<UnpackResult>;
  /** Fetch a queued job's source into the blob cache ahead of its turn (no dm work). */
  prefetch?(ctx: Ctx, o: UnpackOptions): Promise<void>;
}

export interface JobProgress {
  stage: string | null;
  bytes: number | null;
  total: number | null;
}

export interface RunnerHooks {
  onFinish?(job: JobRow, state: "succeeded" | "failed" | "interrupted", durationMs: number): void;
}

export interface RunnerOptions {
  /** Queued jobs whose downloads may run ahead of the running job (0: none). */
  prefetch?: number;
}

export function jobError(e: unknown): JobError {
  if (e instanceof ThinimgError) return { kind: e.kind, message: e.message, hint: e.hint ?? null };
  return { kind: "internal", message: errorMessage(e), hint: "a bug in thinimg: the service log has the stack trace" };
}

/** What a finished unpack job keeps: enough to act on, not every layer's statistics. */
function summary(r: UnpackResult) {
  return {
    image: r.image,
    layers: r.layers.map((l) => ({ chain_id: l.chain_id, thin_id: l.thin_id, device_name: l.device_name, reused: l.reused })),
    built: r.built,
    reused: r.reused,
    dm_work: r.dm_work,
    duration_ms: r.duration_ms,
  };
}

export class JobRunner {
  private stopping = false;
  private wakeUp: (() => void) | null = null;
  private loop: Promise<void> | null = null;
  private current: { job: JobRow; progress: JobProgress; abort: AbortController } | null = null;

  /** Jobs whose prefetch was started (each once), and the abort for all of them. */
  private readonly prefetched = new Set<number>();
  private readonly prefetchAbort = new AbortController();

  constructor(
    private readonly ctx: Ctx,
    private readonly ops: JobOps,
    private readonly hooks: RunnerHooks = {},
    private readonly o: RunnerOptions = {},
  ) {}

  start(): void {
    this.loop ??= this.run();
  }

  /** A job was queued: look at the queue now (and start its download if another job runs). */
  wake(): void {
    this.wakeUp?.();
    if (this.current && !this.stopping) this.prefetchAhead();
  }

  /** The running job's progress (null when it is not the running one). */
  progressOf(id: number): JobProgress | null {
    return this.current?.job.id === id ? { ...this.current.progress } : null;
  }

  get runningJob(): JobRow | null {
    return this.current?.job ?? null;
  }

  /** Take no new job; abort the running job's downloads (its dm work has no abort: it finishes or
   * is cut off by the caller between two commands). Resolves when the loop has ended. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.current?.abort.abort(new ThinimgError("conflict", "the service is stopping"));
    this.prefetchAbort.abort(new ThinimgError("conflict", "the service is stopping"));
    this.wake();
    await this.loop;
  }

  /** The service stops without waiting for the job: record it interrupted (queued again on start). */
  interruptRunning(): JobRow | null {
    const c = this.current;
    if (c) interruptJob(this.ctx.db, c.job.id);
    return c?.job ?? null;
  }

  private async run(): Promise<void> {
    while (!this.stopping) {
      const job = claimNextJob(this.ctx.db, this.ctx.cfg.pool);
      if (!job) {
        await new Promise<void>((resolve) => {
          this.wakeUp = resolve;
        });
        this.wakeUp = null;
        continue;
      }
      this.prefetchAhead();
      await this.runJob(job);
    }
  }

  /** Start the downloads of the next queued jobs (errors are the job's to report when it runs). */
  private prefetchAhead(): void {
    const n = this.o.prefetch ?? 0;
    const prefetch = this.ops.prefetch;
    if (n <= 0 || !prefetch) return;
    for (const job of listJobs(this.ctx.db, this.ctx.cfg.pool, { state: "queued" }).reverse().slice(0, n)) {
      if (this.prefetched.has(job.id)) continue;
      this.prefetched.add(job.id);
      const params = JSON.parse(job.params) as UnpackParams;
      log.debug(`job ${job.id}: prefetching ${job.source}`);
      prefetch(
        { ...this.ctx, progress: undefined },
        { source: job.source, name: job.image, platform: params.platform, signal: this.prefetchAbort.signal },
      ).catch((e: unknown) => log.debug(`job ${job.id}: prefetch failed (the job reports it when it runs): ${errorMessage(e)}`));
    }
  }

  private progressSink(p: JobProgress): Progress {
    return {
      stage(label) {
        p.stage = label;
        p.bytes = null;
        p.total = null;
      },
      bytes(done, total) {
        p.bytes = done;
        p.total = total;
      },
      done() {},
    };
  }

  private async runJob(job: JobRow): Promise<void> {
    const t0 = performance.now();
    const progress: JobProgress = { stage: null, bytes: null, total: null };
    const abort = new AbortController();
    this.current = { job, progress, abort };
    const params = JSON.parse(job.params) as UnpackParams;
    const ctx: Ctx = { ...this.ctx, progress: this.progressSink(progress) };
    log.info(`job ${job.id}: unpack ${job.image} from ${job.source} (attempt ${job.attempts})`);
    let state: "succeeded" | "failed" | "interrupted";
    try {
      const r = await this.ops.unpack(ctx, { source: job.source, name: job.image, platform: params.platform, refresh: params.refresh, signal: abort.signal });
      finishJob(this.ctx.db, job.id, { ok: true, result: summary(r) });
      state = "succeeded";
    } catch (e) {
      if (this.stopping) {
        interruptJob(this.ctx.db, job.id);
        state = "interrupted";
      } else {
        if (!(e instanceof ThinimgError)) log.error(e);
        finishJob(this.ctx.db, job.id, { ok: false, error: jobError(e) });
        state = "failed";
      }
    } finally {
      this.current = null;
    }
    const ms = performance.now() - t0;
    log.info(`job ${job.id}: ${state} in ${Math.round(ms)} ms`);
    this.hooks.onFinish?.(job, state, ms);
  }
}
