"""Server routes under /astria/...: what the frontend's live preview asks the Python side."""
import logging

_registered = False


def register() -> None:
    """Add the pack's routes to ComfyUI's running server once; a no-op without a server."""
    global _registered
    if _registered:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    routes = PromptServer.instance.routes
    for method, path, handler in ROUTES:
        routes.route(method, path)(handler)
    _registered = True
    logging.getLogger("astria").debug("registered %d /astria routes", len(ROUTES))


ROUTES: list = []
