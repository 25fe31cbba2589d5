#!/usr/bin/env bash
# The python the tests use: the `openai` client (unchanged, against the proxy) and moto's
# S3-compatible server (adapter storage), in
# target/py. Created once; prints its interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
py=target/py/bin/python
if ! "$py" -c "import openai, moto" >/dev/null 2>&1; then
  python3 -m venv target/py >&2
  "$py" -m pip install --quiet --disable-pip-version-check 'openai>=1.100,<2' 'moto[server]>=5,<6' >&2
fi
echo "$PWD/$py"
