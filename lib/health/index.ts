// Pre-flight health checks (pool, D-state, kernel log, memory, swap, iowait): see docs/ops-health.md.
export { checkDmesg, classifyKernelLine, parseKmsgRecord } from "./dmesg.ts";
export { type HealthIo, procIo } from "./io.ts";
export { judgePool } from "./pool.ts";
export { assertHealthy, assertReport, DEFAULT_CHECK_TIMEOUT_MS, type HealthOptions, runHealthChecks } from "./run.ts";
export { RUNBOOK } from "./runbook.ts";
export { type CheckResult, type CheckStatus, DEFAULT_THRESHOLDS, type HealthReport, reportJson, type Thresholds, thresholdsJson } from "./types.ts";
