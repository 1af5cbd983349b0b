#!/usr/bin/env bash
# The end-to-end demo: local archive + FHIR server, sample studies, bridge sync, links to open.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-hapi  # the demo's FHIR server is Medplum's engine: no HAPI build
exec .venv/bin/python -m tests.stack demo "$@"
