#!/usr/bin/env bash
# The browser the dashboard test drives: Debian's chromium and chromedriver, installed
# from Debian's packages when missing (as root, or through sudo). Prints chromedriver's path.
set -euo pipefail
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing chromium and chromium-driver (Debian packages) for the dashboard's browser test" >&2
  $sudo apt-get install -y -qq chromium chromium-driver >&2 \
    || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq chromium chromium-driver >&2; }
fi
command -v chromedriver
