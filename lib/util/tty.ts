// "Is this fd a terminal?" without node:tty: importing node:tty (or asking process.stdout.isTTY)
// loads bun's stream classes, which in the test VM costs more than the rest of a command's start.
// Bun's tty_wrap binding is the isatty(3) call node:tty's isatty makes, and nothing else.

interface TtyWrap {
  isTTY(fd: number): boolean;
}

const binding = (process as unknown as { binding(name: "tty_wrap"): TtyWrap }).binding;

/** isatty(fd), as node:tty's isatty answers it. */
export function isTerminal(fd: number): boolean {
  return binding("tty_wrap").isTTY(fd);
}
