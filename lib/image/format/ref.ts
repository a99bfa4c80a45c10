// Matching a user's image selector against tags (docker RepoTags) and OCI ref names, the way a
// docker user expects: "alpine" means "alpine:latest", and "docker.io/library/" is implied.

function normalize(ref: string): string {
  let r = ref.trim();
  const at = r.indexOf("@");
  if (at >= 0) r = r.slice(0, at);
  for (const p of ["docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"]) {
    if (r.startsWith(p)) {
      r = r.slice(p.length);
      break;
    }
  }
  const lastSlash = r.lastIndexOf("/");
  if (!r.slice(lastSlash + 1).includes(":")) r += ":latest";
  return r;
}

export function refMatches(candidate: string, want: string): boolean {
  if (candidate === want) return true;
  // Bare OCI ref names ("latest", "v1.2") only match exactly; full references match normalised.
  return normalize(candidate) === normalize(want);
}
