// The strings the state DB keys things by — named-lock keys and work subjects — built and parsed
// here only, so a reader (GC, the service) never guesses at another module's format.
//   named locks:   image:<pool>:<image name>   layer:<pool>:<chain id>   service:<pool>
//   work subjects: image:<id>   layer:<id>   snapshot:<id>

export const imageLockKey = (pool: string, image: string) => `image:${pool}:${image}`;
export const layerLockKey = (pool: string, chainId: string) => `layer:${pool}:${chainId}`;
export const serviceLockKey = (pool: string) => `service:${pool}`;

/** A lock on one of this pool's images (any image). */
export const isImageLockKey = (pool: string, key: string) => key.startsWith(`image:${pool}:`);
/** A lock on one of this pool's images or layer chains. */
export const isPoolLockKey = (pool: string, key: string) => isImageLockKey(pool, key) || key.startsWith(`layer:${pool}:`);

export type SubjectKind = "image" | "layer" | "snapshot";

export const workSubject = (kind: SubjectKind, id: number) => `${kind}:${id}`;

export function parseWorkSubject(subject: string): { kind: SubjectKind; id: number } | null {
  const m = /^(image|layer|snapshot):(\d+)$/.exec(subject);
  return m ? { kind: m[1] as SubjectKind, id: Number(m[2]) } : null;
}
