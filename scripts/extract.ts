// bun scripts/extract.ts SOURCE DEST [--devices] [--json] [--max-entries N] [--max-bytes SIZE]
//   [--max-file-size SIZE] [--max-depth N] [--max-path-bytes N] [--max-blob-size SIZE]
//   [--select REF] [--platform os/arch] [--state-dir DIR]
// Fetch an image (path, http(s)://…, s3://bucket/key or s3://bucket/prefix/), recognise its format
// (layer family, docker-archive, OCI layout) and apply its layers, in order, into the plain directory
// DEST (absent or empty). No devicemapper. Exit 0 with a summary; non-zero with one line otherwise.
import { start } from "../lib/cli/start.ts";

await start("extract");
