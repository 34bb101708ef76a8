#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[dev]'
set +e
.venv/bin/python -m pytest -n 2 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
if [ "$rc" -eq 5 ]; then echo "scripts/test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
