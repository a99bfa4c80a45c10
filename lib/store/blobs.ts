// Blob cache bookkeeping (the bytes live in <stateDir>/blobs/sha256/<hex>, written by lib/image).
import { type Db, now } from "./db.ts";

export interface BlobRow {
  digest: string;
  size: number;
  compression: "none" | "gzip" | "zstd" | null;
  diff_id: string | null;
  state: "fetching" | "present" | "failed" | "deleted";
  error: string | null;
  created_at: number;
  updated_at: number;
}

export function recordBlob(
  db: Db,
  b: { digest: string; size: number; compression?: BlobRow["compression"]; diffId?: string | null; state?: BlobRow["state"]; error?: string | null },
): void {
  const t = now();
  db.query(
    `INSERT INTO blobs (digest, size, compression, diff_id, state, error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT (digest) DO UPDATE SET size = excluded.size, compression = COALESCE(excluded.compression, compression),
       diff_id = COALESCE(excluded.diff_id, diff_id), state = excluded.state, error = excluded.error, updated_at = excluded.updated_at`,
  ).run(b.digest, b.size, b.compression ?? null, b.diffId ?? null, b.state ?? "present", b.error ?? null, t, t);
}
