"""The image's HEALTHCHECK: the API must answer /healthz; a worker-only container is healthy while it runs."""

import os
import sys
import urllib.request

with open("/proc/1/cmdline", "rb") as f:
    command = f.read().split(b"\0")
if b"serve" not in command and b"run" not in command:
    sys.exit(0)  # `bridge worker` serves no HTTP; Docker restarts it if it exits
port = os.environ.get("BRIDGE_HEALTH_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
