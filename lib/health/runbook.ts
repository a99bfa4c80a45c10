// The step an operator takes when a check warns or blocks. Each points at its section of
// docs/ops-health.md; the pool steps use the recovery runbook (ops/recover-pool.ts).

const DOC = "docs/ops-health.md";

export const RUNBOOK = {
  poolMissing: `bring the pool back with \`bun ops/recover-pool.ts --dir <pool dir>\` (after a reboot), or create one with \`--create\`; or pass the right --pool / THINIMG_POOL (${DOC}#pool-exists)`,
  noDm: `run on a host whose kernel has device-mapper (modprobe dm-thin-pool) with dmsetup installed (apt-get install dmsetup thin-provisioning-tools); in development use \`bun scripts/vm.ts -- …\` (${DOC}#pool-exists)`,
  poolFailed: `stop dm work; read \`dmesg\`; then \`bun ops/recover-pool.ts --dir <pool dir>\` (runs thin_check first; --repair only as it instructs) (${DOC}#pool-status)`,
  poolReadOnly: `the kernel put the pool in read-only mode after a metadata error: stop dm work, then \`bun ops/recover-pool.ts --dir <pool dir>\` (thin_check, --repair if told) (${DOC}#pool-mode)`,
  poolOutOfData: `pool is out of data space: grow it with \`bun ops/recover-pool.ts --dir <pool dir> --grow-data +SIZE\` (GC cannot run until the pool is rw again), then \`bun scripts/gc.ts --force\` (${DOC}#pool-mode)`,
  poolOutOfMeta: `pool is out of metadata space: grow it with \`bun ops/recover-pool.ts --dir <pool dir> --grow-meta +SIZE\` (the pool is rw again once the larger metadata device is loaded), then \`bun scripts/gc.ts --force\` (${DOC}#pool-mode)`,
  poolNeedsCheck: `metadata flagged needs_check: take the pool offline and run \`bun ops/recover-pool.ts --dir <pool dir>\` (thin_check, then --repair if told) (${DOC}#pool-needs-check)`,
  poolData: `free data space (\`bun scripts/gc.ts --force\` removes released images) or grow the pool (\`bun ops/recover-pool.ts --dir <pool dir> --grow-data +SIZE\`) (${DOC}#pool-data)`,
  poolMeta: `free metadata (\`bun scripts/gc.ts --force\`) or grow it (\`bun ops/recover-pool.ts --dir <pool dir> --grow-meta +SIZE\`); a full metadata device turns the pool read-only (${DOC}#pool-metadata)`,
  poolQueue: `the pool queues I/O when full (queue_if_no_space), which can hang writers forever; recreate it with error_if_no_space via \`bun ops/recover-pool.ts\` (${DOC}#pool-no-space-mode)`,
  poolSuspended: `a suspended pool queues all I/O: resume it with \`bun ops/recover-pool.ts --dir <pool dir>\` (it resumes a suspended pool and verifies it), or \`dmsetup resume <pool>\`; find who suspended it (a crashed tool) before dm work (${DOC}#pool-suspended)`,
  deviceSuspended: `resume each with \`dmsetup resume <device>\` (thinimg never leaves one suspended: a crashed tool or a hand-run suspend did), then re-run the check (${DOC}#pool-suspended)`,
  poolStatusUnreadable: `\`dmsetup status <pool>\` failed or hung: check for a suspended device (\`dmsetup info\`) and stuck processes (\`ps -eo pid,stat,wchan:30,comm | awk '$2~/D/'\`) (${DOC}#pool-status)`,
  dstate: `processes are stuck in D state on device-mapper I/O: do not start dm work; check \`dmsetup info\` for SUSPENDED devices (\`dmsetup resume <dev>\`) and the pool's backing storage (${DOC}#host-dstate)`,
  dmesg: `the kernel logged device-mapper or I/O errors since the last check: read them (\`dmesg -T | grep -iE 'device-mapper|dm-[0-9]|I/O error'\`) and check the pool's backing files and disks before continuing (${DOC}#host-dmesg)`,
  dmesgUnreadable: `cannot read the kernel log (/dev/kmsg): run as root (${DOC}#host-dmesg)`,
  memory: `memory is nearly exhausted: stop or move workloads before dm work; the kernel may stall I/O under reclaim (${DOC}#host-memory)`,
  swap: `swap is nearly full: free memory (stop workloads) before dm work (${DOC}#host-swap)`,
  iowait: `the host is saturated with I/O wait: let it drain (check \`iostat -x 1\`/\`vmstat 1\`) before starting dm work (${DOC}#host-iowait)`,
  timeout: `a health check did not finish in time, which usually means the kernel or storage is wedged: investigate before any dm work (${DOC}#timeouts)`,
} as const;
