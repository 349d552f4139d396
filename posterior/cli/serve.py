"""``posterior serve``: the OpenAI-compatible server; the command lives with the server, in
:mod:`posterior.serve.cli` (FastAPI and uvicorn are imported only when it runs)."""

from posterior.serve.cli import add_parser, check, run

__all__ = ["add_parser", "check", "run"]
