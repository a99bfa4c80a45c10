// A GC action for unit tests: a bare delete of thinId unless told otherwise.
import type { Orphan } from "../../lib/gc/model.ts";

export const orphan = (thinId: number | null, device: string | null = null, o: Partial<Orphan> = {}): Orphan => ({
  thinId,
  device,
  unmount: [],
  deleteThin: thinId !== null,
  reason: "not_in_db",
  detail: "",
  ageMs: null,
  mappedBytes: null,
  ...o,
});
