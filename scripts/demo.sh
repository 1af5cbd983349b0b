#!/usr/bin/env bash
# The end-to-end demo: local archive + FHIR server, sample studies, bridge sync, links to open.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tests.stack demo "$@"
