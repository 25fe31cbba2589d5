#!/usr/bin/env bash
# The python the tests drive clients with (the `openai` package, unchanged), in
# target/py. Created once; prints its interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
py=target/py/bin/python
if ! "$py" -c "import openai" >/dev/null 2>&1; then
  python3 -m venv target/py >&2
  "$py" -m pip install --quiet --disable-pip-version-check 'openai>=1.100,<2' >&2
fi
echo "$PWD/$py"
