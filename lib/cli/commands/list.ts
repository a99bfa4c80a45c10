// bun scripts/list.ts — images, layers (and how many images share each), snapshots, pool use.
import { defineCommand } from "citty";
import { log } from "../../log.ts";
import { inventory } from "../../pipeline/inventory.ts";
import { noStateDb, noStateError, openDb } from "../../store/db.ts";
import { formatBytes } from "../../util/units.ts";
import { outputArgs, poolArgs, stateArgs } from "../args.ts";
import { printJson, printText } from "../main.ts";
import { configFrom, waitArgs } from "../pipeline.ts";

export const listCommand = defineCommand({
  meta: { name: "list", description: "List images, layer devices, snapshots and pool use" },
  args: {
    all: { type: "boolean", description: "Include released snapshots", default: false },
    space: { type: "boolean", description: "Show each image's exclusive pool space (reads a metadata snapshot; --no-space: skip)", default: true },
    ...waitArgs,
    ...stateArgs,
    ...poolArgs,
    ...outputArgs,
  },
  async run({ args }) {
    const cfg = configFrom(args);
    // a state dir nothing was unpacked with lists empty and is not created (a mistyped --state-dir
    // leaves no stray state dir behind); the note says so, on stderr
    const known = !noStateDb(cfg.dbPath);
    if (!known) log.warn(noStateError(cfg.dbPath).oneLine());
    const db = openDb(known ? cfg.dbPath : ":memory:");
    try {
      const inv = await inventory(db, cfg.pool, { allSnapshots: args.all, ...(args.space && known ? { stateDir: cfg.stateDir } : {}) });
      if (args.json) {
        printJson({ ok: true, ...inv }, "list");
        return;
      }
      const out: string[] = [];
      const p = inv.pool;
      out.push(
        p.status === "ok"
          ? `pool ${p.name}: ${p.mode}, data ${p.data_used_pct}% (${p.data_used_blocks}/${p.data_total_blocks} blocks), metadata ${p.meta_used_pct}%, transaction ${p.transaction_id}`
          : `pool ${p.name}: ${p.status}${p.detail ? ` (${p.detail})` : ""}`,
      );
      out.push(`images (${inv.images.length}):`);
      for (const i of inv.images) {
        const excl = i.exclusive_bytes === null ? "" : `  exclusive ${formatBytes(i.exclusive_bytes)}`;
        const used = i.active_snapshots
          ? `  ${i.active_snapshots} active snapshot(s)`
          : i.last_activated_at
            ? `  last activated ${i.last_activated_at}`
            : "  never activated";
        out.push(`  ${i.name}  ${i.state}  ${i.layers} layers${excl}${used}  ${i.format ?? "-"}  ${i.source}${i.error ? `  error: ${i.error}` : ""}`);
      }
      if (inv.space_detail && inv.images.length && args.space) out.push(`  (${inv.space_detail})`);
      out.push(`layers (${inv.layers.length}):`);
      for (const l of inv.layers) {
        out.push(
          `  ${l.chain_id.slice(0, 19)}…  ${l.state}${l.state === "building" ? `@${l.phase}` : ""}  ${l.device_name ?? "-"}  thin ${l.thin_id ?? "-"}  used by ${l.images} image(s)${l.error ? `  error: ${l.error}` : ""}`,
        );
      }
      out.push(`snapshots (${inv.snapshots.length}${args.all ? "" : ", without released"}):`);
      for (const s of inv.snapshots) {
        const reattach = s.state === "detached" ? `  needs re-attach: bun scripts/activate.ts --snapshot ${s.id} (or release it)` : "";
        out.push(`  ${s.id}  ${s.image}  ${s.state}  ${s.device_path ?? s.device_name ?? "-"}${reattach}${s.error ? `  error: ${s.error}` : ""}`);
      }
      const t = Object.entries(inv.thin_ids)
        .map(([k, v]) => `${k} ${v}`)
        .join(", ");
      out.push(`thin ids: ${t || "none"}`);
      printText(`${out.join("\n")}\n`);
    } finally {
      db.close();
    }
  },
});

export default listCommand;
