// bun run demo — the whole story in a few minutes, on a real kernel: boots the test VM (User-Mode
// Linux with dm-thin), and inside it creates a loop-backed thin pool, unpacks a generated 5-layer
// image, then a second image that shares its first 3 layers (only 2 layers are built), shows that a
// re-run does nothing, activates a snapshot, mounts it read-only and shows some files, releases it,
// runs a GC dry-run, and prints a summary. Everything it makes lives under one /tmp directory and is
// torn down at the end.

import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { defineCommand } from "citty";
import { outputArgs } from "../lib/cli/args.ts";
import { runMain } from "../lib/cli/main.ts";
import * as dmsetup from "../lib/dm/dmsetup.ts";
import * as losetup from "../lib/dm/losetup.ts";
import { mountinfo } from "../lib/dm/mount.ts";
import { ThinimgError } from "../lib/errors.ts";
import { run, runOk } from "../lib/exec.ts";
import { writeDemoImages } from "../lib/pipeline/demo-image.ts";
import { runInVm } from "../lib/vm/uml.ts";

const ROOT = join(import.meta.dir, "..");
const bold = (s: string) => (process.stdout.isTTY ? `\x1b[1m${s}\x1b[0m` : s);
const say = (s = "") => process.stdout.write(`${s}\n`);
const step = (n: number, s: string) => say(`\n${bold(`== ${n}. ${s}`)}`);

interface Ran {
  code: number;
  out: string;
  ms: number;
}

/** Run one of our scripts the way a user would, echoing the command and its output. */
async function thinimg(env: Record<string, string>, script: string, ...args: string[]): Promise<Ran> {
  say(`$ bun ${script} ${args.join(" ")}`);
  const t0 = performance.now();
  const p = Bun.spawn(["bun", join(ROOT, script), ...args], { env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe", cwd: ROOT });
  const [out, err] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  const ms = Math.round(performance.now() - t0);
  const shown = `${out}${err}`.trimEnd();
  if (shown)
    say(
      shown
        .split("\n")
        .map((l) => `  ${l}`)
        .join("\n"),
    );
  return { code: p.exitCode ?? 1, out, ms };
}

function must(r: Ran, what: string): Ran {
  if (r.code !== 0) throw new ThinimgError("internal", `demo: ${what} failed (exit ${r.code})`, { hint: "see the output above" });
  return r;
}

async function inside(): Promise<void> {
  const work = mkdtempSync("/tmp/thinimg-demo-");
  const pool = `demo${process.pid}`;
  const env = { THINIMG_STATE_DIR: join(work, "state"), THINIMG_POOL: pool, THINIMG_VIRTUAL_SIZE: "1G" };
  const summary: string[] = [];
  try {
    step(1, "create a loop-backed thin pool");
    must(
      await thinimg(env, "ops/recover-pool.ts", "--create", "--dir", join(work, "pool"), "--data-size", "2G", "--meta-size", "64M", "--pool", pool),
      "pool create",
    );

    step(2, "generate two 5-layer images that share layers 1-3 (like the golang/node/python families)");
    const imgs = await writeDemoImages(join(work, "images"));
    for (const f of imgs.families) say(`  ${f.dir}: ${readdirSync(f.dir).sort().join(" ")}`);

    step(3, "unpack the first image: one thin device per layer, each a snapshot of its parent");
    const a = must(await thinimg(env, "scripts/unpack.ts", imgs.families[0]!.dir, "--name", "alpha"), "unpack alpha");
    summary.push(`unpack alpha (5 layers built): ${a.ms} ms`);

    step(4, "unpack the second image: layers 1-3 are reused, only 2 are built");
    const b = must(await thinimg(env, "scripts/unpack.ts", imgs.families[1]!.dir, "--name", "beta"), "unpack beta");
    summary.push(`unpack beta (${/\((\d+ built, \d+ reused)\)/.exec(b.out)?.[1] ?? "?"}): ${b.ms} ms`);

    step(5, "re-run the first unpack: no device work at all");
    const again = must(await thinimg(env, "scripts/unpack.ts", imgs.families[0]!.dir, "--name", "alpha"), "re-run");
    summary.push(`re-run of alpha (no dm work): ${again.ms} ms including bun start-up`);

    step(6, "activate a fresh snapshot of beta (what a microVM would boot)");
    const act = must(await thinimg(env, "scripts/activate.ts", "beta"), "activate");
    const dev = act.out.trim();
    summary.push(`activate beta → ${dev}: ${act.ms} ms`);

    step(7, "mount the snapshot read-only and look inside");
    const mnt = join(work, "mnt");
    mkdirSync(mnt);
    await runOk(["mount", "-o", "ro,noload", dev, mnt]);
    try {
      say(`$ ls -l ${mnt}`);
      say((await runOk(["ls", "-l", mnt])).stdout.trimEnd().replace(/^/gm, "  "));
      for (const f of ["etc/os-release", "app/beta/README", "app/beta/config.json"]) {
        say(`$ cat ${f}`);
        say(readFileSync(join(mnt, f), "utf8").trimEnd().replace(/^/gm, "  "));
      }
      say(`$ ls ${mnt}/app/beta/lib   (layer 5 made this directory opaque)`);
      say(`  ${readdirSync(join(mnt, "app/beta/lib")).join(" ")}`);
      say(`  etc/hostname present? ${existsSync(join(mnt, "etc/hostname")) ? "yes" : "no (whited out by layer 3)"}`);
    } finally {
      await runOk(["umount", mnt]);
    }

    step(8, "list images, layer devices (shared ones are used by 2 images), snapshots, pool use");
    must(await thinimg(env, "scripts/list.ts"), "list");

    step(9, "release the snapshot, then a GC dry-run: the released thin id is what GC would delete");
    must(await thinimg(env, "scripts/release.ts", dev), "release");
    if (existsSync(join(ROOT, "scripts/gc.ts"))) {
      const gc = await thinimg(env, "scripts/gc.ts", "--grace", "0");
      summary.push(`gc dry-run: exit ${gc.code} (nothing removed)`);
    } else say("  (scripts/gc.ts is not there yet)");

    step(10, "summary");
    for (const s of summary) say(`  • ${s}`);
    say("  • layers 1-3 are one set of devices used by both images; each activation is its own snapshot");
  } finally {
    // The demo's own pool and everything on it; never anything else.
    for (const d of await dmsetup.ls().catch(() => [])) {
      if (d.name.startsWith(`thinimg-${pool}-`)) await dmsetup.remove(d.name).catch(() => {});
    }
    await dmsetup.remove(pool).catch(() => {});
    for (const l of await losetup.list().catch(() => [])) if (l.backingFile.startsWith(work)) await losetup.detach(l.device).catch(() => {});
    if (mountinfo().some((m) => m.mountPoint === join(work, "mnt"))) await run(["umount", join(work, "mnt")]).catch(() => {});
    rmSync(work, { recursive: true, force: true });
  }
}

export const demoCommand = defineCommand({
  meta: { name: "demo", description: "Boot the test VM and show unpack → shared layers → activate → mount → release → GC dry-run" },
  args: {
    inside: { type: "boolean", description: "(internal) run the demo steps; used inside the VM", default: false },
    "log-format": outputArgs["log-format"],
  },
  async run({ args }) {
    if (args.inside) {
      if (!existsSync("/dev/mapper/control"))
        throw new ThinimgError("missing", "no device-mapper here", { hint: "run `bun run demo` (it starts the VM itself)" });
      await inside();
      return;
    }
    say(bold("thinimg demo: booting a User-Mode Linux VM with a real dm-thin kernel…"));
    const r = await runInVm({
      argv: ["bun", "scripts/demo.ts", "--inside"],
      cwd: ROOT,
      timeoutMs: 15 * 60_000,
      stdout: (c) => process.stdout.write(c),
      stderr: (c) => process.stderr.write(c),
    });
    if (r.timedOut) throw new ThinimgError("timeout", "demo: the VM run timed out after 15 min", { hint: "the machine may be overloaded; try again" });
    if (r.exitCode !== 0) process.exitCode = r.exitCode ?? 1;
  },
});

if (import.meta.main) await runMain(demoCommand);
