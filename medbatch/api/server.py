"""``medbatch serve``: the API and console under uvicorn, optionally over TLS or behind a reverse
proxy. uvicorn's own access log is off: :class:`medbatch.api.app.AccessLog` logs route templates
instead of paths, so no identifier in a URL reaches a log."""

from __future__ import annotations

import uvicorn

from core.errors import ConfigurationError
from core.settings import Settings
from medbatch.api.app import create_app
from medbatch.services.stack import migrate


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT (uvicorn handles both and finishes requests in flight)."""
    if bool(settings.api_tls_cert) != bool(settings.api_tls_key):
        raise ConfigurationError(
            "set both MEDBATCH_API_TLS_CERT and MEDBATCH_API_TLS_KEY (or neither) for HTTPS"
        )
    migrate(settings)
    proxies = settings.api_forwarded_allow_ips.strip()
    uvicorn.run(
        create_app(settings),
        host=settings.api_bind_address,
        port=settings.api_port,
        ssl_certfile=str(settings.api_tls_cert) if settings.api_tls_cert else None,
        ssl_keyfile=str(settings.api_tls_key) if settings.api_tls_key else None,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
        access_log=False,
        log_level=settings.log_level.lower(),
        server_header=False,
    )
