#!/usr/bin/env bash
# Creates .venv with the bridge and its test dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# The HAPI FHIR JPA test server (Java 17 + Maven): built once, rebuilt only when its sources change.
# --no-hapi (the demo, which runs Medplum's engine only) skips it.
if [ "${1:-}" != "--no-hapi" ]; then
  .venv/bin/python -m tests.stack.hapi --build-only
fi
