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
  /** Ignore Range requests (always 200 with the whole body). */
  noRanges?: boolean;
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
  /** Body bytes the server handed out, by path (to show a client stopped, or resumed). */
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
      const log = (status: number) => requests.push({ method: req.method, path, status, headers: Object.fromEntries(req.headers) });
      if (!f) {
        log(404);
        return new Response("not found\n", { status: 404 });
      }
      const etag = f.etag === undefined ? `"${new Bun.CryptoHasher("md5").update(f.data).digest("hex")}"` : f.etag;
      if (etag && req.headers.get("if-none-match") === etag) {
        log(304);
        return new Response(null, { status: 304, headers: { etag } });
      }
      const headers: Record<string, string> = { "content-type": "application/octet-stream", "accept-ranges": "bytes" };
      if (etag) headers.etag = etag;
      const range = /^bytes=(\d+)-$/.exec(req.headers.get("range") ?? "");
      const ifRange = req.headers.get("if-range");
      if (range && !f.noRanges && f.status === undefined && (!ifRange || ifRange === etag)) {
        const from = Number(range[1]);
        log(206);
        headers["content-range"] = `bytes ${from}-${f.data.length - 1}/${f.data.length}`;
        sent.set(path, (sent.get(path) ?? 0) + f.data.length - from);
        return new Response(f.data.subarray(from), { status: 206, headers });
      }
      const status = f.status ?? 200;
      log(status);
      if (f.chunked || f.extraBytes || f.claimLength !== undefined) {
        delete headers["accept-ranges"];
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
      sent.set(path, (sent.get(path) ?? 0) + f.data.length);
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
 * Content-Length that lies (the connection closes after `body`, whatever was announced). A route
 * may be a function of the request (e.g. cut the first transfer, answer the resume with 206).
 */
export interface RawRequest {
  method: string;
  path: string;
  headers: Record<string, string>;
}

export function startRawHttp(routes: Record<string, RawResponse | ((req: RawRequest) => RawResponse)>): {
  url(path: string): string;
  requests: RawRequest[];
  close(): void;
} {
  const requests: RawRequest[] = [];
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
        const [first, ...lines] = s.data.buf.split("\r\n\r\n")[0]!.split("\r\n");
        const [method = "GET", path = "/"] = first!.split(" ");
        const headers = Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf(":")).trim().toLowerCase(), l.slice(l.indexOf(":") + 1).trim()]));
        const req = { method, path, headers };
        requests.push(req);
        const route = routes[path];
        const r = typeof route === "function" ? route(req) : (route ?? { head: ["HTTP/1.1 404 Not Found", "Content-Length: 0"], body: new Uint8Array(0) });
        s.write(`${[...r.head, "Connection: close"].join("\r\n")}\r\n\r\n`);
        s.write(r.body);
        s.flush();
        // hang up a moment later, so the client has read what was sent before it sees the close
        setTimeout(() => s.end(), 50);
      },
    },
  });
  return { url: (p: string) => `http://127.0.0.1:${server.port}${p}`, requests, close: () => server.stop(true) };
}
