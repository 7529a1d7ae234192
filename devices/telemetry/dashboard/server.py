"""``edgeadapt dashboard``: serve the app with uvicorn, loopback unless a token guards it."""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path

from runtime.errors import ConfigError, EdgeadaptError

log = logging.getLogger(__name__)

TOKEN_ENV = "EDGEADAPT_DASHBOARD_TOKEN"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_.~-]{16,256}$")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(host: str, token: str | None) -> None:
    """Refuse to bind anything but loopback without a token; refuse weak or odd tokens."""
    if token is not None and not TOKEN_PATTERN.match(token):
        raise ConfigError(
            "dashboard token: use 16-256 characters from [A-Za-z0-9_.~-] "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"binding the dashboard to {host} (not loopback) needs a token: --token or ${TOKEN_ENV}"
        )


def serve(db: str | Path, host: str, port: int, token: str | None, poll_s: float = 0.2) -> None:
    """Run the dashboard until interrupted."""
    check_access(host, token)
    try:
        import uvicorn

        from devices.telemetry.dashboard.app import create_app
    except ImportError as exc:
        raise EdgeadaptError(
            f"the dashboard needs its extra ({exc.name} is missing): "
            "pip install 'edgeadapt[dashboard]'"
        ) from None
    app = create_app(db, token=token, poll_s=poll_s)
    log.info("dashboard on http://%s:%d/ (%s)", host, port, "token" if token else "loopback")
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1,
        access_log=False,
    )  # fmt: skip
    uvicorn.Server(config).run()
