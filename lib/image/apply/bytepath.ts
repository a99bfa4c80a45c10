// Linux file names are bytes. The applier carries every path as a "byte string" (one char per
// byte, latin1), so a name that is not UTF-8 reaches the disk exactly as the archive wrote it, and
// every rule (split on "/", "..", ".wh." prefixes, lengths) works on the bytes. This module owns
// the conversions: to an fs path (a plain string when ASCII, else a Buffer of the bytes), from what
// the fs returns, from an ordinary (UTF-8) JS string, and to printable text for messages.
import { lstatSync, readdirSync, readlinkSync } from "node:fs";

const NON_ASCII = /[^\x00-\x7f]/;

/** What node:fs takes for a byte-string path. */
export function fsPath(s: string): string | Buffer {
  return NON_ASCII.test(s) ? Buffer.from(s, "latin1") : s;
}

/** An ordinary JS string (a realpath, a CLI argument) as a byte string. */
export function byteString(s: string): string {
  return NON_ASCII.test(s) ? Buffer.from(s, "utf8").toString("latin1") : s;
}

/** Target of the symlink at byte-string path p, as a byte string. */
export function readLink(p: string): string {
  return readlinkSync(fsPath(p), { encoding: "buffer" }).toString("latin1");
}

/**
 * Names in directory p (byte strings) and whether each is a directory. d_type is used when every
 * name is ASCII-safe through the string API; otherwise names are read as bytes and lstat'ed.
 */
export function readDir(p: string): { name: string; dir: boolean }[] {
  const fast = readdirSync(fsPath(p), { withFileTypes: true });
  if (!fast.some((d) => NON_ASCII.test(d.name))) {
    return fast.map((d) => ({
      name: d.name,
      dir: d.isDirectory() || (!d.isSymbolicLink() && !d.isFile() && lstatSync(fsPath(`${p}/${d.name}`)).isDirectory()),
    }));
  }
  return readdirSync(fsPath(p), { encoding: "buffer" }).map((b) => {
    const name = b.toString("latin1");
    return { name, dir: lstatSync(fsPath(`${p}/${name}`)).isDirectory() };
  });
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * A byte string as one printable line: valid UTF-8 shown as text, every other byte and every
 * control character as \xNN, bounded. Entry names come from hostile input.
 */
export function displayBytes(s: string, max = 200): string {
  let text: string;
  if (!NON_ASCII.test(s)) text = s;
  else {
    const b = Buffer.from(s, "latin1");
    try {
      text = utf8.decode(b);
    } catch {
      text = escapeInvalid(b);
    }
  }
  let out = text.replace(/[\u0000-\u001f\u007f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
  if (out.length > max) out = `${out.slice(0, max)}…`;
  return out === "" ? '""' : out;
}

/** UTF-8 decode that shows each byte of an invalid sequence as \xNN (never U+FFFD). */
function escapeInvalid(b: Buffer): string {
  let out = "";
  let i = 0;
  while (i < b.length) {
    const c = b[i]!;
    const n = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (n > 0 && i + n <= b.length) {
      try {
        out += utf8.decode(b.subarray(i, i + n));
        i += n;
        continue;
      } catch {}
    }
    out += `\\x${c.toString(16).padStart(2, "0")}`;
    i++;
  }
  return out;
}
