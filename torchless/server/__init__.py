"""``torchless serve``: an OpenAI-compatible HTTP server with continuous batching.

Needs the ``serve`` extra (``pip install "torchless[serve]"``: Starlette and uvicorn).

    from torchless.server import Server
    app = Server(model, "my-model", parallel=4, ctx=2048).app()   # an ASGI app
"""
from .scheduler import Scheduler, common_prefix_len  # noqa: F401

try:
    from .app import Server  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    _IMPORT_ERROR = exc

    def __getattr__(name):
        if name == "Server":
            from ..errors import TorchlessError

            raise TorchlessError(f"torchless serve needs the 'serve' extra "
                                 f"(pip install \"torchless[serve]\"): {_IMPORT_ERROR}")
        raise AttributeError(name)


def serve(model, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          parallel: int = 4, ctx: int = 2048, api_key: str | None = None,
          queue_size: int | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn in this thread, the scheduler in another)."""
    try:
        import uvicorn

        from .app import Server
    except ImportError as exc:
        from ..errors import TorchlessError

        raise TorchlessError(f"torchless serve needs the 'serve' extra "
                             f"(pip install \"torchless[serve]\"): {exc}") from None
    server = Server(model, model_name, parallel=parallel, ctx=ctx, api_key=api_key,
                    queue_size=queue_size)
    uvicorn.run(server.app(), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
