// "Is this fd a terminal?" without node:tty: importing node:tty (or asking process.stdout.isTTY)
// loads bun's stream classes, which in the test VM costs more than the rest of a command's start.
// Bun's tty_wrap binding is the isatty(3) call node:tty's isatty makes, and nothing else. It is an
// internal binding, so a bun without it falls back to node:tty.

interface TtyWrap {
  isTTY(fd: number): boolean;
}

let isatty: ((fd: number) => boolean) | null = null;

function pick(): (fd: number) => boolean {
  try {
    const b = (process as unknown as { binding(name: "tty_wrap"): TtyWrap }).binding("tty_wrap");
    if (typeof b?.isTTY === "function") return (fd) => b.isTTY(fd);
  } catch {}
  return (require("node:tty") as typeof import("node:tty")).isatty;
}

/** isatty(fd), as node:tty's isatty answers it. */
export function isTerminal(fd: number): boolean {
  isatty ??= pick();
  return isatty(fd);
}
