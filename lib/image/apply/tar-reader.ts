// A push-based tar reader for layer application over the one header decoder
// (archive/tar-format.ts): ustar, GNU, star and v7 headers, PAX with raw binary values, GNU long
// names, GNU sparse files (old GNU 'S' with extension blocks, PAX 0.0, 0.1 and 1.0). Synchronous and
// allocation-light: file data is handed to the sink as slices of the input chunks, never copied,
// each with its position in the file (a sparse file's holes are never handed over).
//
// Why not node-tar's Parser (which the project otherwise uses): it drops PAX `SCHILY.xattr.*`
// records (so `security.capability` would be lost), decodes PAX bodies as UTF-8 text (binary xattr
// values would be mangled anyway), ignores devmajor/devminor in GNU-format headers, has no GNU
// sparse support, and turns a corrupt header into a warning and carries on.
import { BLOCK, HeaderDecoder, padOf, type SparseRegion, type TarEntry } from "../archive/tar-format.ts";

export { type EntryType, type TarEntry, TarFormatError } from "../archive/tar-format.ts";

export interface TarSink {
  /** A header. For type "file", data() delivers its stored bytes, then fileEnd(). */
  entry(e: TarEntry): void;
  /** `len` bytes of the current file's data, to be written at file offset `pos`. */
  data(buf: Buffer, off: number, len: number, pos: number): void;
  fileEnd(): void;
}

/** What the next whole block is: a header, an old-GNU sparse extension, a PAX 1.0 sparse map. */
type Expect = "header" | "ext" | "map";
type State = "block" | "data" | "skip" | "meta" | "eof";

export class TarReader {
  private readonly dec = new HeaderDecoder();
  private state: State = "block";
  private expect: Expect = "header";
  private hdr = Buffer.alloc(BLOCK);
  private hdrFill = 0;
  private remain = 0; // bytes left in data / skip / meta
  private pad = 0; // padding to skip after data or meta
  private padOnly = false; // the current "skip" is block padding, not an ignored body
  private meta: Buffer | null = null;
  private metaFill = 0;
  private metaAt = 0;
  // The file whose header was read but not yet handed over (sparse extension blocks / map to come).
  private file: TarEntry | null = null;
  private stored = 0;
  // A PAX 1.0 sparse map being collected: its blocks, their newlines, the newlines it needs.
  private map = Buffer.alloc(0);
  private mapFill = 0;
  private mapNewlines = 0;
  private mapNeed = 1;
  // Regions of the file being written: where the next data bytes go.
  private regions: SparseRegion[] = [];
  private ri = 0;
  private regionLeft = 0;
  private filePos = 0;
  /** Stream bytes consumed so far. */
  offset = 0;
  /** True once the end-of-archive marker was read (two zero blocks). */
  sawEof = false;

  constructor(private readonly sink: TarSink) {}

  push(chunk: Buffer): void {
    let pos = 0;
    const len = chunk.length;
    while (pos < len) {
      switch (this.state) {
        case "block": {
          if (this.hdrFill === 0 && len - pos >= BLOCK) {
            this.offset += BLOCK;
            pos += BLOCK;
            this.block(chunk, pos - BLOCK);
          } else {
            const n = Math.min(BLOCK - this.hdrFill, len - pos);
            chunk.copy(this.hdr, this.hdrFill, pos, pos + n);
            this.hdrFill += n;
            pos += n;
            this.offset += n;
            if (this.hdrFill === BLOCK) {
              this.hdrFill = 0;
              this.block(this.hdr, 0);
            }
          }
          break;
        }
        case "data": {
          if (this.regionLeft === 0) this.nextRegion();
          const n = Math.min(this.regionLeft, len - pos);
          this.sink.data(chunk, pos, n, this.filePos);
          pos += n;
          this.offset += n;
          this.remain -= n;
          this.regionLeft -= n;
          this.filePos += n;
          if (this.remain === 0) {
            this.sink.fileEnd();
            this.afterBody();
          }
          break;
        }
        case "skip": {
          const n = Math.min(this.remain, len - pos);
          pos += n;
          this.offset += n;
          this.remain -= n;
          if (this.remain === 0) this.afterBody();
          break;
        }
        case "meta": {
          const n = Math.min(this.remain, len - pos);
          chunk.copy(this.meta!, this.metaFill, pos, pos + n);
          this.metaFill += n;
          pos += n;
          this.offset += n;
          this.remain -= n;
          if (this.remain === 0) {
            const body = this.meta!;
            this.meta = null;
            this.dec.meta(body, this.metaAt);
            this.afterBody();
          }
          break;
        }
        case "eof":
          // Trailing bytes after the end marker (record padding) are read, not interpreted.
          this.offset += len - pos;
          pos = len;
          break;
      }
    }
  }

  /** The input ended. Throws on truncation; a missing end marker is accepted (as Go does). */
  end(): void {
    if (this.state === "eof") return;
    if (this.state === "block" && this.hdrFill === 0 && this.expect === "header") {
      this.dec.end(this.offset);
      return;
    }
    if (this.state === "block" && this.expect !== "header") {
      this.fail(`truncated archive: the sparse map of the entry at offset ${this.file!.offset} ends early`, this.offset, true);
    }
    if (this.state === "block") this.fail(`truncated archive: partial header block (${this.hdrFill} of 512 bytes) at offset ${this.offset - this.hdrFill}`);
    if (this.state === "data") this.fail(`truncated archive: file data ends ${this.remain} bytes early at offset ${this.offset}`, this.offset, true);
    if (this.state === "meta") this.fail(`truncated archive: extended header ends ${this.remain} bytes early at offset ${this.offset}`);
    // Only block padding is missing after the last entry: GNU tar and Go both accept this.
    if (this.state === "skip" && this.padOnly) return;
    this.fail(`truncated archive: ${this.remain} bytes missing at offset ${this.offset}`);
  }

  private fail(msg: string, offset = this.offset, inEntry = false): never {
    return this.dec.fail(msg, offset, inEntry);
  }

  private afterBody(): void {
    if (this.pad > 0) {
      this.remain = this.pad;
      this.pad = 0;
      this.padOnly = true;
      this.state = "skip";
    } else {
      this.state = "block";
    }
  }

  private block(b: Buffer, o: number): void {
    const at = this.offset - BLOCK;
    if (this.expect === "ext") {
      if (!this.dec.sparseExt(this.file!, this.stored, b, o, at)) this.startFile(this.file!, this.stored);
      return;
    }
    if (this.expect === "map") {
      this.mapBlock(b, o);
      return;
    }
    const step = this.dec.block(b, o, at);
    switch (step.kind) {
      case "zero":
        return;
      case "eof":
        this.state = "eof";
        this.sawEof = true;
        return;
      case "meta":
        this.startMeta(step.size, at);
        return;
      case "skip":
        this.skipBody(step.size);
        return;
      case "entry": {
        const e = step.entry;
        if (step.ext || step.map1x0) {
          this.file = e;
          this.stored = step.stored;
          this.expect = step.ext ? "ext" : "map";
          if (step.map1x0 && step.stored === 0) this.fail(`GNU sparse map missing at offset ${at}`, at, true);
          return;
        }
        if (e.type === "file") this.startFile(e, step.stored);
        else {
          this.sink.entry(e);
          this.skipBody(step.stored);
        }
      }
    }
  }

  private mapBlock(b: Buffer, o: number): void {
    if (this.mapFill + BLOCK > this.map.length) {
      const grown = Buffer.alloc(Math.max(4 * BLOCK, 2 * this.map.length));
      this.map.copy(grown, 0, 0, this.mapFill);
      this.map = grown;
    }
    b.copy(this.map, this.mapFill, o, o + BLOCK);
    for (let i = o; i < o + BLOCK; i++) if (b[i] === 0x0a) this.mapNewlines++;
    this.mapFill += BLOCK;
    const buf = this.map.subarray(0, this.mapFill);
    const r = this.dec.sparseMap1x0(this.file!, this.stored, buf, this.mapNewlines, this.mapNeed, this.file!.offset);
    if ("need" in r) {
      this.mapNeed = r.need;
      return;
    }
    this.map = Buffer.alloc(0);
    this.mapFill = 0;
    this.mapNewlines = 0;
    this.mapNeed = 1;
    // The map takes whole blocks, all read by now; the data follows.
    this.startFile(this.file!, this.stored - r.used);
  }

  /** Hand a regular file over; its `stored` data bytes follow. */
  private startFile(e: TarEntry, stored: number): void {
    this.expect = "header";
    this.file = null;
    this.sink.entry(e);
    this.regions = e.sparse ?? [{ offset: 0, length: stored }];
    this.ri = 0;
    this.regionLeft = 0;
    this.filePos = 0;
    if (stored === 0) {
      this.sink.fileEnd();
      this.remain = 0;
      this.pad = 0;
      this.state = "block";
      return;
    }
    this.remain = stored;
    this.pad = padOf(stored);
    this.state = "data";
  }

  /** The next non-empty data region (the map was checked to cover exactly the data stored). */
  private nextRegion(): void {
    let r = this.regions[this.ri++]!;
    while (r.length === 0) r = this.regions[this.ri++]!;
    this.regionLeft = r.length;
    this.filePos = r.offset;
  }

  private skipBody(size: number): void {
    const total = size + padOf(size);
    if (total === 0) {
      this.state = "block";
    } else {
      this.remain = total;
      this.pad = 0;
      this.padOnly = false;
      this.state = "skip";
    }
  }

  private startMeta(size: number, at: number): void {
    this.metaAt = at + BLOCK;
    if (size === 0) {
      this.dec.meta(Buffer.alloc(0), this.metaAt);
      this.state = "block";
      return;
    }
    this.meta = Buffer.allocUnsafe(size);
    this.metaFill = 0;
    this.remain = size;
    this.pad = padOf(size);
    this.state = "meta";
  }
}
