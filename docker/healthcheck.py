"""Container health probe: exit 0 only when the API's ``/readyz`` answers 200.

Slim Python images ship no curl or wget, so the Dockerfile's ``HEALTHCHECK`` runs this with the
image's own interpreter (standard library only). ``/readyz`` rather than ``/healthz`` because a
container that is alive but has no complete model and index loaded must not receive traffic.
``HEALTHCHECK_URL`` overrides the target (the stack test points it at its own port).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/readyz"


def probe(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    """Return (healthy, reason); any connection error or non-200 status is unhealthy."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed http URL
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"unreachable: {exc}"


def main() -> int:
    url = os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    healthy, reason = probe(url)
    print(f"healthcheck {url}: {reason}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
