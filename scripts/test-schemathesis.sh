#!/usr/bin/env bash
# The schemathesis CLI (property-based fuzzing of the HTTP API from its OpenAPI document; see
# scripts/fuzz_report.py for the per-operation summary of its NDJSON report), pinned, in
# target/schemathesis-venv. Created once; prints the executable's path.
# SCHEMATHESIS_PYTHON picks the interpreter for a new venv (default python3); on Python 3.11
# keep schemathesis at its default `--workers 1` (threads trip a CPython ast bug there).
set -euo pipefail
cd "$(dirname "$0")/.."
version=4.32.5
venv=target/schemathesis-venv
st=$venv/bin/schemathesis
if [ ! -x "$st" ] || ! "$venv/bin/python" -c \
  "import importlib.metadata as m, sys; sys.exit(m.version('schemathesis') != '$version')" >/dev/null 2>&1; then
  "${SCHEMATHESIS_PYTHON:-python3}" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$version" >&2
fi
echo "$PWD/$st"
