"""Issue 11, defects 10 and 14: a port in use is an error, not a second server sharing it;
SIGTERM during the model load exits at once; streams cut by a drain end with a final
FINISH_REASON_ABORT message, as the proto promises, not with an error."""

import asyncio
from dataclasses import replace

import pytest

from server.api.grpc_server import build_server
from tests.api.conftest import loopback
from tests.api.harness import ServerThread


def test_a_second_server_on_the_same_port_is_an_error():
    first = ServerThread(loopback(), None)
    try:
        async def second() -> None:
            build_server(replace(loopback(), port=first.server.port))

        with pytest.raises(OSError, match=rf"^cannot listen on 127\.0\.0\.1:{first.server.port}: is another process using it\?"):
            asyncio.run(second())
    finally:
        first.stop()
