// thinimg's version (package.json): `--version`, the pool record, metrics.
import pkg from "../package.json" with { type: "json" };

export const THINIMG_VERSION: string = pkg.version;
