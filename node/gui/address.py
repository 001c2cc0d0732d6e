"""Where the page is served: a loopback address, parsed from `run --gui`, and its bound socket."""

import errno
import ipaddress
import socket

import attrs

from node.gui.errors import GuiError

DEFAULT_PORT = 8395
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"


@attrs.frozen
class GuiAddress:
    """A loopback address and port for the page (port 0: any free port)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "GuiAddress":
        """Read "HOST:PORT", "[V6]:PORT" or "PORT"; refuse an address that is not loopback."""
        host, _, port_text = text.rpartition(":")
        host = (host or "127.0.0.1").removeprefix("[").removesuffix("]")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            port = int(port_text)
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise GuiError(f"--gui takes HOST:PORT with a loopback IP, like {DEFAULT_ADDRESS}; got {text!r}") from None
        if not 0 <= port <= 65535:
            raise GuiError(f"--gui: port {port} is not between 0 and 65535")
        if not loopback:
            raise GuiError(
                f"--gui {text}: the page is served on loopback only (it has no TLS); "
                f"from another machine, reach it through `ssh -L {DEFAULT_PORT}:{DEFAULT_ADDRESS} HOST`"
            )
        return cls(host, port)

    def host_header(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


def bind(address: GuiAddress) -> socket.socket:
    """A socket bound to `address`, not yet listening; GuiError (one line) if it cannot be."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((address.host, address.port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise GuiError(f"the page's address {address.host_header(address.port)} is in use; "
                           "choose another with `run --gui 127.0.0.1:PORT`, or `--no-gui`") from None  # fmt: skip
        raise GuiError(f"cannot serve the page on {address.host_header(address.port)}: {error.strerror}") from None
    return sock
