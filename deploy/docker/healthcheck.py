"""Container health check: exit 0 when the server is ready (GET /ready answers 200), else 1.

Used by the image's HEALTHCHECK and the compose file. Reads the port from LAMINA_PORT and, when health
endpoints need a key (LAMINA_AUTH_HEALTH), sends the first of LAMINA_API_KEYS.
"""

import os
import sys
import urllib.request

port = os.environ.get("LAMINA_PORT", "8000")
request = urllib.request.Request(f"http://127.0.0.1:{port}/ready")
if os.environ.get("LAMINA_AUTH_HEALTH", "").lower() in ("1", "true", "yes", "on"):
    key = os.environ.get("LAMINA_API_KEYS", "").strip().strip("[]").split(",")[0].strip().strip('"')
    if key:
        request.add_header("Authorization", f"Bearer {key}")
try:
    with urllib.request.urlopen(request, timeout=float(os.environ.get("LAMINA_HEALTHCHECK_TIMEOUT", "4"))) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # 503 while loading/draining, refused while starting
    print(f"not ready: {e}", file=sys.stderr)
    sys.exit(1)
