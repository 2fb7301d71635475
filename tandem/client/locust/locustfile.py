"""Locust over Tandem's Python client, for teams already load-testing with locust.

Each user streams requests back to back through `TandemClient` and fires one locust request
event per request, type "E2E" (end to end), named by adapter ("(base)" for the base model),
with the tokens generated as the response length: locust's Aggregated row, RPS and CSV totals
count each request once. Its time to first token goes into a stats entry of its own, type
"TTFT" under the same name, which is shown and written to the CSV beside the others but feeds
no total: a request served logs its TTFT there, a request with no first token (failed,
aborted, or a stream that ended without a token) is a failure there too, and one that failed
after its first token logs nothing. Locust's web UI, CSV output and distributed mode work
unchanged. Needs `pip install 'tandem[locust]'`.

    locust -f tandem/client/locust/locustfile.py --host localhost:50051 \\
        --popularity zipf --adapters a,b,c --max-new-tokens 64 --headless -u 16 -r 4 -t 2m
"""

import os
import sys
import time

# gRPC must cooperate with gevent's greenlets before the first channel exists.
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
from locust import User, constant, events, task  # noqa: E402

from tandem.client import TandemClient, TandemRpcError  # noqa: E402
from tandem.client.bench.popularity import POPULARITIES, build_popularity, check_popularity_flags  # noqa: E402
from tandem.client.bench.prompts import synthetic_prompts  # noqa: E402
from tandem.client.bench.stats import BASE_MODEL  # noqa: E402
from tandem.client.flag_types import ranged  # noqa: E402


@events.init_command_line_parser.add_listener
def _tandem_options(parser) -> None:
    parser.add_argument("--popularity", choices=POPULARITIES, default="none", help="adapter choice per request")
    parser.add_argument("--adapters", default=None, help="adapter names in popularity order, comma-separated")
    parser.add_argument("--zipf-alpha", type=ranged(float, 0), default=None, help="Zipf exponent for --popularity zipf (default 1)")
    parser.add_argument("--adapter-weights", default=None, help="JSON file of adapter -> weight for --popularity weights")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (generated past end-of-sequence)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds each request may take")
    parser.add_argument("--token", default=os.environ.get("TANDEM_TOKEN"), help="bearer token, when the server has auth on [env TANDEM_TOKEN]")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca-cert)")
    parser.add_argument("--ca-cert", default=None, help="PEM CA to trust (default: system roots)")
    parser.add_argument("--client-cert", default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--client-key", default=None, help="PEM key of --client-cert")


@events.init.add_listener
def _popularity(environment, **_) -> None:
    """The adapter choice, built once and checked before any user starts: a flag the chosen
    --popularity does not read (`--adapters a,b` under the default `none` sent everything to
    the base model) or a missing one is a usage error, as argparse's are, not an exception
    in every user's on_start."""
    options = environment.parsed_options
    try:
        check_popularity_flags(options.popularity, {"--adapters": options.adapters}, options.zipf_alpha, options.adapter_weights)
        names = [n.strip() for n in (options.adapters or "").split(",") if n.strip()]
        alpha = 1.0 if options.zipf_alpha is None else options.zipf_alpha
        environment.tandem_popularity = build_popularity(options.popularity, names, None, alpha, options.adapter_weights)
    except (OSError, ValueError) as error:
        print(f"locust: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


class GenerationAborted(Exception):
    """A stream the server ended with finish reason abort: a failure, not a served request."""


class NoFirstToken(Exception):
    """A stream that ended without a token: it has no time to first token."""


class TandemUser(User):
    """One closed-loop client: a request, then the next as soon as it ends."""

    wait_time = constant(0)
    host = "localhost:50051"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.popularity = self.environment.tandem_popularity
        self.prompts = synthetic_prompts()
        self.rng = np.random.default_rng()
        self.max_new_tokens = options.max_new_tokens
        self.client = TandemClient(
            self.host, token=options.token, tls=options.tls, ca_cert=options.ca_cert, client_cert=options.client_cert,
            client_key=options.client_key, timeout=options.request_timeout, max_retries=0,
        )

    def on_stop(self) -> None:
        self.client.close()

    def _report(self, adapter: str, seconds: float, tokens: int, error: Exception | None = None) -> None:
        """The request itself, end to end: the one event locust's totals count."""
        self.environment.events.request.fire(
            request_type="E2E", name=adapter or BASE_MODEL, response_time=seconds * 1000, response_length=tokens,
            exception=error, context={},
        )

    def _report_ttft(self, adapter: str, seconds: float, tokens: int, error: Exception | None = None) -> None:
        """Time to first token, logged straight into its own stats entry: fired as a request
        event it would count every request twice in the Aggregated row, RPS and CSV totals,
        and mix TTFT into the E2E percentiles there. A worker sends the entry to the master
        with the others (distributed mode), its total apart."""
        entry = self.environment.stats.get(adapter or BASE_MODEL, "TTFT")
        entry.log(seconds * 1000, tokens)
        if error is not None:
            entry.log_error(error)

    @task
    def stream(self) -> None:
        adapter = self.popularity.draw(1, self.rng)[0]
        prompt = self.prompts[int(self.rng.integers(len(self.prompts)))]
        started = time.perf_counter()
        first_token = None
        tokens, finish_reason = 0, None
        error: Exception | None = None
        try:
            for chunk in self.client.stream(adapter=adapter, max_new_tokens=self.max_new_tokens, ignore_eos=True,
                                            **prompt.request_fields()):
                if first_token is None and chunk.token_ids:
                    first_token = time.perf_counter()
                tokens, finish_reason = chunk.generated_tokens, chunk.finish_reason or finish_reason
        except TandemRpcError as rpc_error:
            error = rpc_error
        ended = time.perf_counter()
        if error is None and finish_reason == "abort":  # a draining server ends its generations so, with status OK
            error = GenerationAborted("the server aborted the generation (it was stopping)")
        if first_token is None:  # a failed TTFT, not a request missing from its row nor its E2E as a TTFT
            self._report_ttft(adapter, ended - started, tokens, error or NoFirstToken("the stream ended without a token"))
        elif error is None:
            self._report_ttft(adapter, first_token - started, tokens)
        self._report(adapter, ended - started, tokens, error)
