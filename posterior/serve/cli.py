"""``posterior serve --model PATH --backend hf|vllm --host 127.0.0.1 --port 8000 [--api-key KEY]``.

Binds the address first (a port in use fails at once, in one line, before anything loads), loads
the prior once, then serves :func:`posterior.serve.app.create_app` with uvicorn until
SIGTERM or Ctrl-C; on either, uvicorn stops accepting connections, lets the requests in flight
finish (streams included), then the sampler worker ends and the process exits (0 after SIGTERM,
130 after Ctrl-C). The line
``posterior: serving http://HOST:PORT`` on stderr gives the port (useful with ``--port 0``: any
free port). The API key comes from ``--api-key`` or the environment variable POSTERIOR_API_KEY;
without one, requests are not authenticated (fine on 127.0.0.1, not on a shared network). Bodies
above ``--max-body-bytes`` (default 1 MiB) are refused with 413 before they are parsed.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import textwrap

from posterior.cli import options
from posterior.serve.protocol import ServeConfig

DESCRIPTION = (
    "Serve pi*(x) ∝ pi0(x)·exp(r(x)/beta) behind an OpenAI-compatible HTTP API: /v1/completions and "
    "/v1/chat/completions take a 'posterior' object (reward, beta, method, options; the openai client's "
    "extra_body) and answer with weighted samples and their diagnostics."
)
EPILOG = """\
request body extra (openai client: extra_body={"posterior": {...}}):
  {"posterior": {"reward": "sentiment", "beta": 0.1, "method": "smc", "particles": 16, "options": {"ess_threshold": 0.5}}}
  without it: plain prior samples. With is/smc the n choices are draws by weight from the population
  of "particles" (default --particles): each a sample of pi*, so n=1 is an aligned answer.
  temperature / top_p / top_k are the prior's for that request; temperature 0 returns the
  highest-weight text of the population (an estimate of pi*'s mode); stop / stop_token_ids end the
  prior there (the stop text is not returned). stream=true with method smc streams the text all
  surviving particles share as soon as it is fixed. posterior.token_logprobs "posterior" (or
  --token-logprobs posterior) makes logprobs / echo report estimates of log pi* per token; with
  --default-posterior, lm-eval's loglikelihood then reads log pi* (docs/serving.md).

example:
  posterior serve --model ./my-model --port 8000 --api-key secret
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret');
    print(c.completions.create(model='my-model', prompt='The movie was', n=4, max_tokens=16,
          extra_body={'posterior': {'reward': 'sentiment', 'beta': 0.1, 'method': 'smc'}}))"
"""


def add_parser(subparsers):
    s = options.add_subparser(subparsers, "serve", help="serve pi* behind an OpenAI-compatible HTTP API",
                              description=textwrap.fill(DESCRIPTION, 96), epilog=EPILOG)  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed on stderr)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $POSTERIOR_API_KEY, else none)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model's names: requests may use any, responses carry the first; others get 404 (default: the "
                        "--model folder's name)")  # fmt: skip
    s.add_argument("--max-n", type=int, default=64, help="largest n (choices) a request may ask for")
    s.add_argument("--particles", type=int, default=ServeConfig.default_particles,
                   help="population of a request's posterior when it gives no posterior.particles: is/smc draw the n "
                        "choices from it by weight; bon/soft_bon use it as best_of, pgibbs as its particles")  # fmt: skip
    s.add_argument("--max-particles", type=int, default=ServeConfig.max_particles, help="largest posterior.particles a request may ask for")
    s.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for (default: the model's context)")
    s.add_argument("--max-prompts", type=int, default=16, help="largest list of prompts in one completions request")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    s.add_argument("--batch-window-ms", type=float, default=20.0, help="how long a request waits for others to share its sampler call")
    s.add_argument("--max-batch-prompts", type=int, default=32, help="most prompts in one sampler call (1 with window 0: no batching)")
    s.add_argument("--max-body-bytes", type=int, default=ServeConfig.max_body_bytes,
                   help="largest request body in bytes, refused (413) before it is parsed (default 1 MiB: 16 prompts "
                        "of 8k tokens of plain text)")  # fmt: skip
    s.add_argument("--allow-reward-paths", action="store_true",
                   help="let requests use rewards that read files or load models (classifier:PATH:LABEL, "
                        "classifier-logit:PATH:LABEL, similarity:TEXT); rewards that do neither (sentiment, afinn, "
                        "textblob, contains:, length:, repetition, judge:, ensembles of these) are always allowed")  # fmt: skip
    s.add_argument("--default-posterior", default=None, metavar="JSON",
                   help="the posterior object of a request that sends none (default: none, plain prior samples), e.g. "
                        "'{\"reward\": \"sentiment\", \"beta\": 0.5, \"horizon\": 64}': clients that cannot send one "
                        "(lm-eval's loglikelihood) get aligned answers")  # fmt: skip
    s.add_argument("--token-logprobs", choices=["prior", "posterior"], default="prior",
                   help="what logprobs / echo report for a request with a posterior object that does not say "
                        "(posterior.token_logprobs): log pi0 per token, or estimates of log pi* whose sum over any span "
                        "estimates log pi*(span | text before it) (docs/serving.md)")  # fmt: skip
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    options.add_model_options(s)
    return s


def check(args):
    """Every argument, before the model (or torch) loads; returns the ServeConfig (api key and limits)."""
    options.check_model(args, command="posterior serve")
    if args.chat:
        raise ValueError("posterior serve takes no --chat: /v1/chat/completions applies the model's chat template itself")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.batch_window_ms < 0:
        raise ValueError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    key = args.api_key if args.api_key is not None else os.environ.get("POSTERIOR_API_KEY") or None
    names = args.served_model_name or [os.path.basename(os.path.normpath(args.model)) if args.model else "SmolLM2-135M-Instruct"]
    try:
        config = ServeConfig(model_name=names[0], aliases=tuple(dict.fromkeys(names[1:])), max_n=args.max_n,
                             default_particles=args.particles, max_particles=args.max_particles, max_tokens=args.max_tokens, max_prompts=args.max_prompts,
                             allow_reward_paths=args.allow_reward_paths, window_s=args.batch_window_ms / 1000.0,
                             max_batch_prompts=args.max_batch_prompts, max_queue=args.max_queue, api_key=key,
                             max_body_bytes=args.max_body_bytes, token_logprobs=args.token_logprobs,
                             default_posterior=args.default_posterior)  # fmt: skip
    except ValueError as e:  # name the option, not the field
        raise ValueError(f"{e} (posterior serve option --{str(e).split()[0].replace('_', '-')})") from None
    if config.default_posterior is not None:  # its fields, checked as a request's would be
        import json

        from posterior.rewards.registry import REWARDS
        from posterior.serve.protocol import BadRequest, parse_posterior

        try:
            parse_posterior(json.loads(config.default_posterior), config, n=1, max_tokens=1, reward_names=set(REWARDS))
        except BadRequest as e:
            raise ValueError(f"--default-posterior: {e}") from None
    options.check_device(args)
    return config


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening: the address is ours before the model
    loads, so a port in use fails at once, in one line (``ValueError``), instead of after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # reuse a port in TIME_WAIT, never one in use
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        in_use = e.errno == errno.EADDRINUSE
        why = "the port is in use (another server?); choose another --port, or --port 0 for any free one" if in_use else e.strerror or e
        raise ValueError(f"posterior serve cannot listen on {host}:{port}: {why}") from None
    return sock


def run(args) -> int:
    config = check(args)
    sock = bind(args.host, args.port)
    try:
        try:
            import uvicorn

            from posterior.serve.app import create_app
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"posterior serve needs FastAPI and uvicorn: pip install 'posterior-align[serve]' ({e})") from e
        if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            options.stage(args, f"warning: serving on {args.host} without an API key (--api-key or POSTERIOR_API_KEY)")
        options.stage(args, f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'}")
        prior = options.load_prior(args)
    except BaseException:
        sock.close()
        raise
    app = create_app(prior, config=config)
    # Until here a client is refused (bound, not listening); from now on connections wait in the
    # backlog until uvicorn accepts them.
    try:
        sock.listen(2048)
    except OSError as e:  # another process bound the port too (SO_REUSEADDR) and listened first
        prior.close()
        sock.close()
        raise ValueError(f"posterior serve cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=None))
    options.stage(args, f"serving http://{args.host}:{port} (model {config.model_name!r}; SIGTERM or Ctrl-C drains and stops)")
    # uvicorn handles SIGTERM / SIGINT itself (stop accepting, drain, stop the worker) and then
    # raises the signal again with the handler found at start: for SIGTERM that is this one, so a
    # drained shutdown exits 0 (SIGINT keeps Python's handler: "interrupted", exit 130).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.run(sockets=[sock])
    finally:
        prior.close()
        sock.close()
    return 0


__all__ = ["add_parser", "bind", "check", "run"]
