#!/usr/bin/env bash
# The sandbox the eval's coding probe runs model-written code in: Debian's bubblewrap,
# installed from Debian's packages when missing (as root, or through sudo). Prints bwrap's path.
set -euo pipefail
if ! command -v bwrap >/dev/null; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing bubblewrap (Debian package) for the eval's coding-probe sandbox" >&2
  $sudo apt-get install -y -qq bubblewrap >&2 \
    || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq bubblewrap >&2; }
fi
command -v bwrap
