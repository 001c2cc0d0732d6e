"""Errors of the local page."""

from node.errors import NodeError


class GuiError(NodeError):
    """The local page cannot be served as asked (an address that is not loopback, a port in use)."""

    rpc_error_type = "gui_error"


class GuiRequestError(GuiError):
    """A request from the page that the node refused; its message is shown on the page."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code
