"""``posterior serve``: an OpenAI-compatible HTTP server that samples pi*(x) ∝ pi0(x)·exp(r(x)/beta).

Requests ask for aligned samples with a ``posterior`` object in the body (what the ``openai``
client sends with ``extra_body``); concurrent requests of equal settings share sampler calls; with
``stream: true`` SMC streams the text that no later resampling can change. Needs the ``serve``
extra (FastAPI, uvicorn). See :mod:`posterior.serve.app` for the endpoints,
:mod:`posterior.serve.protocol` for the request and response fields,
:mod:`posterior.serve.batcher` for batching and seeds, :mod:`posterior.serve.streaming` for why a
streamed prefix is final.
"""

from posterior.serve.protocol import ServeConfig


def create_app(prior, *, config=None):
    """See :func:`posterior.serve.app.create_app` (imported on use: FastAPI is an optional extra)."""
    from posterior.serve.app import create_app as _create

    return _create(prior, config=config)


__all__ = ["ServeConfig", "create_app"]
