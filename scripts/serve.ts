// bun scripts/serve.ts --secret-file FILE --allow-source s3://images-bucket/ [--listen 127.0.0.1:7878]
// The thinimg service: a signed webhook for unpacks (durable jobs) and activations, /metrics,
// /healthz, /readyz. docs/ops-service.md has the API, a signed curl request and the systemd units.
import { start } from "../lib/cli/start.ts";

await start("serve");
