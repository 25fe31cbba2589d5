#!/usr/bin/env bash
# The official `tinker` Python SDK, pinned to the release docs/tinker-wire.md describes, in
# target/tinker-venv, for tinker/tests/python_sdk.rs (the SDK against claas-fake-tinker).
# Created once; prints its interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.38.0
venv=target/tinker-venv
py=$venv/bin/python
if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('tinker') != '$version')" \
  >/dev/null 2>&1; then
  python3 -m venv "$venv" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "tinker==$version" >&2
fi
echo "$PWD/$py"
