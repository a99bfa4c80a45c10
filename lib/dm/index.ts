// lib/dm: typed wrappers over the device-mapper tools. Import as namespaces.
export * as dmsetup from "./dmsetup.ts";
export * from "./errors.ts";
export * from "./loop-pool.ts";
export * as losetup from "./losetup.ts";
export * from "./mkfs.ts";
export * as mount from "./mount.ts";
export * as pool from "./pool.ts";
export * from "./status.ts";
export * as thintools from "./thintools.ts";
export * from "./udev.ts";
export * from "./validate.ts";
