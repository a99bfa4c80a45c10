// A step of a VM test scenario that runs once, when the first test that needs it asks: each test
// awaits the steps it builds on, so any one test also runs alone (-t NAME), and a failed assertion
// in one test does not change what the next one sees.
export function once<T>(fn: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | undefined;
  return () => (p ??= fn());
}
