// A real S3 server for tests: npm s3rver, in-process, on 127.0.0.1, behind a node:http server that
// records every request (method, path, whether it was signed) so tests can count downloads and
// check anonymous access really is unsigned.
import crypto from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { S3Client } from "bun";
// @ts-expect-error s3rver ships no types
import S3rver from "s3rver";

// s3rver builds ListObjectsV2 continuation tokens with createCipheriv("des"), an alias BoringSSL
// (Bun) lacks; "des-cbc" is the same cipher. Test-only shim so paginated listings work.
const origCipher = crypto.createCipheriv;
const origDecipher = crypto.createDecipheriv;
if (!(crypto as unknown as { __thinimgDesShim?: boolean }).__thinimgDesShim) {
  // biome-ignore lint/suspicious/noExplicitAny: shim over node's overloaded signatures
  (crypto as any).createCipheriv = (alg: string, ...rest: any[]) => (origCipher as any)(alg === "des" ? "des-cbc" : alg, ...rest);
  // biome-ignore lint/suspicious/noExplicitAny: shim over node's overloaded signatures
  (crypto as any).createDecipheriv = (alg: string, ...rest: any[]) => (origDecipher as any)(alg === "des" ? "des-cbc" : alg, ...rest);
  (crypto as unknown as { __thinimgDesShim?: boolean }).__thinimgDesShim = true;
}

export const S3_KEY = "S3RVER";
export const S3_SECRET = "S3RVER";

export interface S3Request {
  method: string;
  path: string;
  query: string;
  signed: boolean;
  range: string | null;
}

export interface TestS3 {
  endpoint: string;
  requests: S3Request[];
  /** A signed client for setting up fixtures. */
  client(bucket: string): S3Client;
  put(bucket: string, key: string, data: string | Uint8Array): Promise<void>;
  /** GET requests for one object key (downloads), counted from the request log. */
  gets(bucket: string, key: string): number;
  /** Env for the code under test: endpoint + region, plus credentials when signed. */
  env(signed: boolean): Record<string, string>;
  close(): Promise<void>;
}

export async function startS3(buckets: string[]): Promise<TestS3> {
  const dir = mkdtempSync("/tmp/thinimg-s3rver-");
  const s3rver = new S3rver({
    silent: true,
    directory: dir,
    configureBuckets: buckets.map((name) => ({ name, configs: [] })),
  });
  await s3rver.configureBuckets();
  const handler = s3rver.getMiddleware();
  const requests: S3Request[] = [];
  const server = http.createServer((req, res) => {
    const u = new URL(req.url ?? "/", "http://x");
    requests.push({
      method: req.method ?? "",
      path: decodeURIComponent(u.pathname),
      query: u.search,
      signed: !!req.headers.authorization || u.searchParams.has("X-Amz-Signature"),
      range: req.headers.range ?? null,
    });
    handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
  const { port } = server.address() as AddressInfo;
  const endpoint = `http://127.0.0.1:${port}`;
  const client = (bucket: string) => new S3Client({ endpoint, bucket, accessKeyId: S3_KEY, secretAccessKey: S3_SECRET, region: "us-east-1" });
  return {
    endpoint,
    requests,
    client,
    async put(bucket, key, data) {
      await client(bucket).write(key, data);
    },
    gets(bucket, key) {
      return requests.filter((r) => r.method === "GET" && r.path === `/${bucket}/${key}`).length;
    },
    env(signed) {
      return {
        AWS_ENDPOINT_URL: endpoint,
        AWS_REGION: "us-east-1",
        ...(signed ? { AWS_ACCESS_KEY_ID: S3_KEY, AWS_SECRET_ACCESS_KEY: S3_SECRET } : {}),
      };
    },
    async close() {
      server.closeAllConnections?.();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
