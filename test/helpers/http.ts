// A real HTTP server for tests (Bun.serve on 127.0.0.1) serving in-memory files, with a request log
// and knobs for misbehaviour: lying Content-Length, endless bodies, missing ETags.
import type { Server } from "bun";

export interface Served {
  data: Uint8Array;
  /** Send this ETag (default: a hash of the data); null sends none. */
  etag?: string | null;
  /** Stream the body chunked (no Content-Length). */
  chunked?: boolean;
  /** Claim this Content-Length (then close early if larger than the data). */
  claimLength?: number;
  /** After the data, keep sending this many more bytes (chunked). */
  extraBytes?: number;
  status?: number;
}

export interface HttpRequestLog {
  method: string;
  path: string;
  status: number;
  headers: Record<string, string>;
}

export interface TestHttp {
  url(path: string): string;
  files: Map<string, Served>;
  requests: HttpRequestLog[];
  /** Bytes the server managed to enqueue for streamed bodies, by path (to show a client stopped). */
  sent: Map<string, number>;
  close(): Promise<void>;
}

export function startHttp(initial: Record<string, Served> = {}): TestHttp {
  const files = new Map(Object.entries(initial));
  const requests: HttpRequestLog[] = [];
  const sent = new Map<string, number>();
  const server: Server<undefined> = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch(req) {
      const path = decodeURIComponent(new URL(req.url).pathname);
      const f = files.get(path);
      const log = (status: number) =>
        requests.push({ method: req.method, path, status, headers: Object.fromEntries(req.headers) });
      if (!f) {
        log(404);
        return new Response("not found\n", { status: 404 });
      }
      const etag = f.etag === undefined ? `"${new Bun.CryptoHasher("md5").update(f.data).digest("hex")}"` : f.etag;
      if (etag && req.headers.get("if-none-match") === etag) {
        log(304);
        return new Response(null, { status: 304, headers: { etag } });
      }
      const status = f.status ?? 200;
      log(status);
      const headers: Record<string, string> = { "content-type": "application/octet-stream" };
      if (etag) headers.etag = etag;
      if (f.chunked || f.extraBytes || f.claimLength !== undefined) {
        const chunk = 64 * 1024;
        let off = 0;
        let extra = f.extraBytes ?? 0;
        sent.set(path, 0);
        const body = new ReadableStream<Uint8Array>({
          pull(controller) {
            if (off < f.data.length) {
              const c = f.data.subarray(off, off + chunk);
              off += c.length;
              sent.set(path, (sent.get(path) ?? 0) + c.length);
              controller.enqueue(c);
            } else if (extra > 0) {
              const n = Math.min(chunk, extra);
              extra -= n;
              sent.set(path, (sent.get(path) ?? 0) + n);
              controller.enqueue(new Uint8Array(n).fill(0x41));
            } else controller.close();
          },
        });
        if (f.claimLength !== undefined) headers["content-length"] = String(f.claimLength);
        return new Response(body, { status, headers });
      }
      return new Response(f.data, { status, headers });
    },
  });
  return {
    url: (p: string) => `http://127.0.0.1:${server.port}${p}`,
    files,
    requests,
    sent,
    async close() {
      await server.stop(true);
    },
  };
}

export interface RawResponse {
  /** Status line + headers, exactly as sent (no Content-Length added). */
  head: string[];
  body: Uint8Array;
}

/**
 * A deliberately broken HTTP/1.1 server on a raw TCP socket, for what Bun.serve will not do: a
 * Content-Length that lies (the connection closes after `body`, whatever was announced).
 */
export function startRawHttp(routes: Record<string, RawResponse>): { url(path: string): string; close(): void } {
  const server = Bun.listen<{ buf: string }>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open(s) {
        s.data = { buf: "" };
      },
      data(s, chunk) {
        s.data.buf += new TextDecoder().decode(chunk);
        if (!s.data.buf.includes("\r\n\r\n")) return;
        const path = s.data.buf.split(" ")[1] ?? "/";
        const r = routes[path] ?? { head: ["HTTP/1.1 404 Not Found", "Content-Length: 0"], body: new Uint8Array(0) };
        s.write(`${[...r.head, "Connection: close"].join("\r\n")}\r\n\r\n`);
        s.write(r.body);
        s.flush();
        s.end();
      },
    },
  });
  return { url: (p: string) => `http://127.0.0.1:${server.port}${p}`, close: () => server.stop(true) };
}
