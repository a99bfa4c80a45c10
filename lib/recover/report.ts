// The recover-pool report (stable keys for --json) and its human rendering: the narrative on stderr,
// and on stdout (dry run only) the commands that would run, as a shell script an operator can read or run.
import type { PoolStatus } from "../dm/status.ts";
import type { Step } from "./runbook.ts";

export type RecoverAction = "created" | "recovered" | "grown" | "healthy" | "blocked";

export interface StatusJson {
  kind: "ok" | "fail" | "error";
  mode: string | null;
  needs_check: boolean | null;
  transaction_id: number | null;
  data_used: number | null;
  data_total: number | null;
  data_used_pct: number | null;
  meta_used: number | null;
  meta_total: number | null;
  meta_used_pct: number | null;
  no_space: string | null;
  discard: string | null;
  held_root: number | null;
}

export interface RecoverReport {
  ok: boolean;
  pool: string | null;
  dir: string;
  action: RecoverAction;
  dry_run: boolean;
  steps: Step[];
  status: StatusJson | null;
  devices: { metadata: string | null; data: string | null };
  error: { kind: string; message: string; hint: string | null } | null;
  next_steps: string[];
  exit_code: number;
}

export function statusJson(s: PoolStatus): StatusJson {
  if (s.kind !== "ok") {
    return {
      kind: s.kind,
      mode: null,
      needs_check: null,
      transaction_id: null,
      data_used: null,
      data_total: null,
      data_used_pct: null,
      meta_used: null,
      meta_total: null,
      meta_used_pct: null,
      no_space: null,
      discard: null,
      held_root: null,
    };
  }
  return {
    kind: "ok",
    mode: s.mode,
    needs_check: s.needsCheck,
    transaction_id: s.transactionId,
    data_used: s.dataUsed,
    data_total: s.dataTotal,
    data_used_pct: s.dataUsedPct,
    meta_used: s.metaUsed,
    meta_total: s.metaTotal,
    meta_used_pct: s.metaUsedPct,
    no_space: s.noSpace,
    discard: s.discard,
    held_root: s.heldRoot,
  };
}

export interface Rendered {
  stdout: string[];
  stderr: string[];
}

const WHAT: Record<RecoverReport["action"], string> = {
  created: "created",
  recovered: "recovered",
  grown: "grown",
  healthy: "healthy, nothing changed",
  blocked: "blocked",
};

export function renderReport(r: RecoverReport): Rendered {
  const err: string[] = [];
  const out: string[] = [];
  const width = Math.max(0, ...r.steps.map((s) => s.name.length));
  for (const s of r.steps) {
    err.push(`  ${s.status.padEnd(7)} ${s.name.padEnd(width)}  ${s.detail ?? ""}`.trimEnd());
    if (s.command && s.status !== "planned") err.push(`  ${"".padEnd(7)} ${"".padEnd(width)}  $ ${s.command}`);
  }
  const st = r.status;
  const statusLine =
    st?.kind === "ok"
      ? ` (${st.mode}${st.needs_check ? ", needs_check" : ""}; data ${st.data_used_pct}% used, metadata ${st.meta_used_pct}% used)`
      : st
        ? ` (status ${st.kind})`
        : "";
  const pool = r.pool ?? "?";
  if (r.ok) {
    err.push(
      r.dry_run
        ? `dry run: pool ${pool} in ${r.dir} would be ${r.action === "healthy" ? "left alone (healthy)" : r.action}; nothing was changed`
        : `pool ${pool} ${WHAT[r.action]}${statusLine}`,
    );
  } else if (r.error) {
    err.push(`error: ${r.error.message}${r.error.hint ? ` — ${r.error.hint}` : ""}`);
    if (r.next_steps.length) {
      err.push("next steps:");
      for (const c of r.next_steps) err.push(`  ${c}`);
    }
  }
  if (r.dry_run) {
    out.push(`# recover-pool --dry-run: pool ${pool} in ${r.dir}: ${r.ok ? `would be ${r.action}` : "blocked"}`);
    for (const s of r.steps) {
      if (s.status !== "planned") continue;
      out.push(s.command ?? `# ${s.detail ?? s.name}`);
    }
    if (!r.ok && r.next_steps.length) {
      out.push("# blocked; next steps:");
      for (const c of r.next_steps) out.push(c.startsWith("#") ? c : `# ${c}`);
    }
  }
  return { stdout: out, stderr: err };
}
