#!/usr/bin/env bash
# One-shot set-up on a fresh Debian 12 machine with node/npm, as root: Debian packages, bun from
# npm, the project's dependencies. Idempotent: re-running it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(user-mode-linux kmod dmsetup thin-provisioning-tools e2fsprogs util-linux mount umoci skopeo tar gzip zstd
      debootstrap procps)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
BUN_VERSION=1.4.5
if ! command -v bun >/dev/null || [ "$(bun --version 2>/dev/null)" != "$BUN_VERSION" ]; then
  echo "setup: installing bun $BUN_VERSION from npm" >&2
  npm install -g --no-fund --no-audit "bun@$BUN_VERSION" >/dev/null 2>&1
fi
bun install --frozen-lockfile >/dev/null 2>&1 || bun install
# the commands' start-up bundles (.build/): a bundle that no longer matches its sources is never run,
# so a failed build only means the commands start from the sources (slower, same behaviour)
bun scripts/build.ts || echo "setup: start-up bundles not built; the commands run from the sources" >&2
echo "setup: ok (bun $(bun --version), $(linux.uml --version 2>/dev/null | head -1 || echo uml))" >&2
