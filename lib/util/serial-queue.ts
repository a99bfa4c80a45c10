// A promise chain that runs async operations one at a time, in the order asked (the in-process part
// of the host dm queue, and the pool sections).
export class SerialQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private depth = 0;

  run<T>(fn: () => Promise<T>): Promise<T> {
    this.depth++;
    const next = this.tail.then(fn, fn);
    // keep the chain alive whatever fn does; callers see their own result/error
    this.tail = next.then(
      () => {
        this.depth--;
      },
      () => {
        this.depth--;
      },
    );
    return next;
  }

  /** Operations queued or running (for tests and diagnostics). */
  get pending(): number {
    return this.depth;
  }
}
