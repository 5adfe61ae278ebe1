#!/usr/bin/env bash
# Install fastproxy and everything its tests use, then run the whole test suite.
# Extra arguments go to pytest (e.g. ./test.sh -k reload).
set -euo pipefail
cd "$(dirname "$0")"
TEST_PACKAGES=1 EXTRAS="test,bench" source scripts/setup-env.sh
exec .venv/bin/python -m pytest "$@"
