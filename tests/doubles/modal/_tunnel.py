"""The DOUBLE's `Tunnel`, shaped like the real `modal._tunnel.Tunnel` (same fields and
properties), so adapter code reading `.url` or `.tls_socket` works unchanged."""
from __future__ import annotations

from dataclasses import dataclass

from .exception import InvalidError


@dataclass(frozen=True)
class Tunnel:
    """A container port reachable from outside: TLS at (host, port), plain TCP (if any) at
    (unencrypted_host, unencrypted_port)."""

    host: str
    port: int
    unencrypted_host: str
    unencrypted_port: int

    @property
    def url(self) -> str:
        """The public HTTPS URL; like the real one, ':443' is left out."""
        return f"https://{self.host}" if self.port == 443 else f"https://{self.host}:{self.port}"

    @property
    def tls_socket(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def tcp_socket(self) -> tuple[str, int]:
        if not self.unencrypted_host:
            raise InvalidError("This tunnel is not configured for unencrypted TCP.")
        return (self.unencrypted_host, self.unencrypted_port)
