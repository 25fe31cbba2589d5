#!/usr/bin/env bash
# The schemathesis CLI for property-based fuzzing of the HTTP API from its OpenAPI document,
# in target/schemathesis-venv (pinned). Created once; prints the executable's path.
set -euo pipefail
cd "$(dirname "$0")/.."
version=4.32.5
venv=target/schemathesis-venv
st=$venv/bin/schemathesis
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '$version')" >/dev/null 2>&1 \
  || [ ! -x "$st" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$version" >&2
fi
echo "$PWD/$st"
