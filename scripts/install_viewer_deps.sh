#!/usr/bin/env bash
# Installs what the graph viewer and its browser test need. Idempotent and quiet: each step
# does nothing when its result is already in place, so CI can call it on every run.
#
#   1. Headless Chromium (Debian package "chromium"), only if /usr/bin/chromium is missing.
#      The test drives it with --dump-dom, so no chromedriver or Python package is needed.
#   2. The viewer's vendored JavaScript (d3, dagre, pako and their licenses), fetched from the
#      npm registry with `npm pack` only if a file under em_circuits/attribution/viewer_assets/vendor/ is
#      missing or differs from the committed SHA256SUMS. The files are committed so the viewer
#      works offline; this step restores or re-verifies them.
#
# Usage: scripts/install_viewer_deps.sh [--no-browser] [--no-js]
set -euo pipefail

want_browser=1
want_js=1
for arg in "$@"; do
  case "$arg" in
    --no-browser) want_browser=0 ;;
    --no-js) want_js=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install_viewer_deps.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor_dir="$repo_root/em_circuits/attribution/viewer_assets/vendor"

# npm package, file inside its tarball, name under vendor/. dagre's dist bundles graphlib and
# parts of lodash, so their licenses ship too.
vendor_files=(
  "d3@7.9.2 package/dist/d3.min.js d3.min.js"
  "d3@7.9.2 package/LICENSE LICENSE.d3.txt"
  "dagre@0.8.5 package/dist/dagre.min.js dagre.min.js"
  "dagre@0.8.5 package/LICENSE LICENSE.dagre.txt"
  "graphlib@2.1.8 package/LICENSE LICENSE.graphlib.txt"
  "lodash@4.17.21 package/LICENSE LICENSE.lodash.txt"
  "pako@2.1.0 package/dist/pako_inflate.min.js pako_inflate.min.js"
  "pako@2.1.0 package/LICENSE LICENSE.pako.txt"
)

install_browser() {
  [ -x /usr/bin/chromium ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root (or sudo) to apt-get install chromium" >&2; exit 1; }
    sudo="sudo -n"
  fi
  echo "installing chromium (apt-get; takes a few minutes)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  [ -x /usr/bin/chromium ] || { echo "apt-get did not provide /usr/bin/chromium" >&2; exit 1; }
}

vendor_ok() {
  [ -f "$vendor_dir/SHA256SUMS" ] && (cd "$vendor_dir" && sha256sum --quiet --check SHA256SUMS \
    >/dev/null 2>&1)
}

fetch_js() {
  vendor_ok && return 0
  command -v npm >/dev/null || { echo "npm is needed to fetch the viewer's JavaScript" >&2; exit 1; }
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  mkdir -p "$vendor_dir"
  local entry pkg inner name tarball
  for entry in "${vendor_files[@]}"; do
    read -r pkg inner name <<<"$entry"
    if [ ! -d "$tmp/$pkg" ]; then
      tarball="$(cd "$tmp" && npm pack --silent "$pkg" 2>/dev/null | tail -n 1)"
      mkdir -p "$tmp/$pkg"
      tar -xzf "$tmp/$tarball" -C "$tmp/$pkg"
    fi
    cp "$tmp/$pkg/$inner" "$vendor_dir/$name"
  done
  if [ -f "$vendor_dir/SHA256SUMS" ]; then
    # The registry must serve exactly the bytes that were reviewed and committed.
    vendor_ok || { echo "vendored JS differs from $vendor_dir/SHA256SUMS" >&2; exit 1; }
  else
    (cd "$vendor_dir" && sha256sum d3.min.js dagre.min.js pako_inflate.min.js LICENSE.*.txt \
      >SHA256SUMS)
  fi
}

[ "$want_js" -eq 1 ] && fetch_js
[ "$want_browser" -eq 1 ] && install_browser
exit 0
