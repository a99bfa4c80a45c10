// bun scripts/health.ts [--pool NAME] [--json] [--ack] [--kernel-error-window 15m]
//                       [--data-warn 80 --data-block 95 --meta-warn 75 --meta-block 90]
// The pre-flight health checks as a command: exit 0 healthy (warnings allowed), 1 blocked, with the
// reason and the runbook step. --ack first acknowledges the kernel errors checks have recorded (logged
// with who and when), then checks. docs/ops-health.md explains every check.
import { start } from "../lib/cli/start.ts";

await start("health");
