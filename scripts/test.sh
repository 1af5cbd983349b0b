#!/usr/bin/env bash
# The test suite: unit tests and integration tests against real Orthanc, FHIR (Medplum, and HAPI
# FHIR JPA, which setup.sh builds) and PostgreSQL servers, which the tests start themselves
# (installing Debian's packages if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
