// bun scripts/serve.ts --secret-file FILE --allow-source s3://images-bucket/ [--listen 127.0.0.1:7878]
// The thinimg service: a signed webhook for unpacks (durable jobs) and activations, /metrics,
// /healthz, /readyz. docs/ops-service.md has the API, a signed curl request and the systemd units.

import { defineCommand } from "citty";
import { log } from "../../log.ts";
import { DEFAULT_LISTEN, parseListen } from "../../server/listen.ts";
import { DEFAULT_DRAIN_MS, DEFAULT_RETENTION_MS, startService } from "../../server/service.ts";
import { parseDuration, parseIntArg } from "../../util/units.ts";
import { limitArgs } from "../args.ts";
import { configFrom, pipelineArgs, sizeArgs } from "../pipeline.ts";

/** Every value of a repeatable string flag (citty keeps only the last). */
function repeated(rawArgs: string[], flag: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    if (a === flag && i + 1 < rawArgs.length) out.push(rawArgs[++i]!);
    else if (a.startsWith(`${flag}=`)) out.push(a.slice(flag.length + 1));
  }
  return out;
}

export const serveCommand = defineCommand({
  meta: { name: "serve", description: "Run the thinimg service (webhook for unpack jobs and activations, Prometheus metrics)" },
  args: {
    listen: { type: "string", description: `HOST:PORT or unix:/PATH; env THINIMG_LISTEN (default ${DEFAULT_LISTEN})` },
    "secret-file": {
      type: "string",
      description: "HMAC secret for X-Thinimg-Signature (re-read on SIGHUP); required unless --insecure-no-auth or --token-file",
    },
    "token-file": { type: "string", description: "Also accept Authorization: Bearer with this token (re-read on SIGHUP)" },
    "insecure-no-auth": { type: "boolean", description: "No authentication at all: loopback or unix socket only, for local tests", default: false },
    "allow-source": {
      type: "string",
      description:
        "Source prefix callers may unpack from (repeatable; e.g. s3://images-bucket/); also env THINIMG_ALLOW_SOURCES (space-separated); default: none",
    },
    prefetch: { type: "string", description: "Queued jobs whose downloads may run ahead of the running one (default 1; 0: none)", default: "1" },
    retention: { type: "string", description: "Keep finished jobs this long (default 7d as 168h)", default: `${DEFAULT_RETENTION_MS / 3_600_000}h` },
    "drain-timeout": {
      type: "string",
      description: "On SIGTERM, wait this long for the running job before interrupting it",
      default: `${DEFAULT_DRAIN_MS / 1000}s`,
    },
    "health-max-age": {
      type: "string",
      description: "Activations and releases proceed on a passed background pre-flight at most this old (default 5s; 0: the checks run in every request)",
      default: "5s",
    },
    "health-interval": { type: "string", description: "The background pre-flight runs when the last one is this old (default 2s)", default: "2s" },
    ...sizeArgs,
    ...limitArgs,
    ...pipelineArgs,
  },
  async run({ args, rawArgs }) {
    const service = await startService({
      cfg: configFrom(args),
      listen: parseListen(args.listen || process.env.THINIMG_LISTEN || DEFAULT_LISTEN),
      secretFile: args["secret-file"],
      tokenFile: args["token-file"],
      insecureNoAuth: args["insecure-no-auth"],
      allowSources: [...repeated(rawArgs, "--allow-source"), ...(process.env.THINIMG_ALLOW_SOURCES ?? "").split(/\s+/).filter(Boolean)],
      retentionMs: parseDuration(args.retention, "--retention"),
      prefetch: parseIntArg(args.prefetch, "--prefetch", { min: 0, max: 16 }),
      drainMs: parseDuration(args["drain-timeout"], "--drain-timeout"),
      healthMaxAgeMs: parseDuration(args["health-max-age"], "--health-max-age"),
      healthPeriodMs: parseDuration(args["health-interval"], "--health-interval"),
    });
    process.on("SIGHUP", () => service.reloadSecrets());
    await new Promise<void>((resolve) => {
      const onStop = (sig: string) => () => {
        log.warn(`${sig}: stopping (new requests get 503; the running job may finish)`);
        service.stop().then(() => resolve());
      };
      process.on("SIGTERM", onStop("SIGTERM"));
      process.on("SIGINT", onStop("SIGINT"));
    });
  },
});

export default serveCommand;
