// Where the service listens: HOST:PORT (IPv4, [IPv6] or localhost) or unix:/PATH. One module builds
// and parses the form; --insecure-no-auth asks isLocalOnly().
import { isAbsolute } from "node:path";
import { usageError } from "../errors.ts";

export const DEFAULT_LISTEN = "127.0.0.1:7878";

export type Listen = { kind: "tcp"; host: string; port: number } | { kind: "unix"; path: string };

export function parseListen(raw: string): Listen {
  if (raw.startsWith("unix:")) {
    const path = raw.slice(5);
    if (!isAbsolute(path) || /[\0-\x1f]/.test(path))
      throw usageError(`--listen ${raw}: the socket path must be absolute`, "use e.g. unix:/run/thinimg/thinimg.sock");
    return { kind: "unix", path };
  }
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(raw);
  const port = m ? Number(m[2]) : Number.NaN;
  if (!m || port > 65535) throw usageError(`--listen ${raw}: not HOST:PORT or unix:/PATH`, `use e.g. ${DEFAULT_LISTEN} or unix:/run/thinimg/thinimg.sock`);
  return { kind: "tcp", host: m[1]!.replace(/^\[|\]$/g, ""), port };
}

/** Reachable from this host only: a loopback address or a unix socket. */
export function isLocalOnly(l: Listen): boolean {
  if (l.kind === "unix") return true;
  return l.host === "localhost" || l.host === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(l.host);
}

export function formatListen(l: Listen, port?: number): string {
  if (l.kind === "unix") return `unix:${l.path}`;
  const host = l.host.includes(":") ? `[${l.host}]` : l.host;
  return `${host}:${port ?? l.port}`;
}
