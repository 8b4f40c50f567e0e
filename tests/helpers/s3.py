"""A real S3-compatible server for the tests: moto's S3 server on 127.0.0.1, reached over HTTP.

The server is moto's own WSGI application in a threaded werkzeug server, built the way
``moto.server.ThreadedMotoServer`` builds it, in threads of the test session. Clients reach it
only through s3fs/botocore over HTTP: nothing is mocked in process. Running it here (rather
than as a subprocess) lets a test *stop* it mid-upload (listening socket and live connections
closed, as a crashed server's) and start it again on the same port with its buckets intact,
since moto keeps them in this process.

Use: ``from helpers.s3 import s3_bucket_fixture, s3_server_fixture  # noqa: F401`` in a test module
(the fixtures are named ``s3_server`` and ``s3_bucket``); ``s3_bucket``
gives a fresh ``s3://<bucket>`` for each test, with fsspec configured (for the whole session)
to reach the server, so URLs work with no ``storage_options`` (as in a Trainer).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers.ports import free_port

# Short timeouts and few retries: a stopped server must fail a save in seconds, not minutes.
CLIENT_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 2, "read_timeout": 30}


class S3Server:
    """moto's S3 server on ``127.0.0.1:<port>``; :meth:`stop` and :meth:`start` keep its data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Called with (method, path and query) before each request; returning True stops the
        # server right there (that request gets no answer).
        self.stop_on: Callable[[str, str], bool] | None = None
        self.requests: list[tuple[str, str, str | None]] = []  # method, path?query, Range header
        self.saved_config: Any = None  # fsspec's s3 configuration before the tests replaced it

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": CLIENT_CONFIG,
        }

    def start(self) -> None:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        server_self = self

        class Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with server_self._lock:
                    server_self._connections.add(self.connection)

            def finish(self) -> None:
                with server_self._lock:
                    server_self._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def log_request(self, *args: Any, **kwargs: Any) -> None:  # quiet
                pass

            def log_error(self, *args: Any, **kwargs: Any) -> None:  # a stopped server's broken pipes
                pass

        app = DomainDispatcherApplication(create_backend_app)

        def watched(environ: dict[str, Any], start_response: Any) -> Any:
            target = environ.get("PATH_INFO", "") + (
                "?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else ""
            )
            self.requests.append((environ["REQUEST_METHOD"], target, environ.get("HTTP_RANGE")))
            if self.stop_on is not None and self.stop_on(environ["REQUEST_METHOD"], target):
                self.stop_on = None
                with contextlib.suppress(KeyError, OSError):  # this request gets no answer at all
                    environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                threading.Thread(target=self.stop, daemon=True).start()
                raise ConnectionAbortedError("the test stopped the server")
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", self.port, watched, threaded=True, request_handler=Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="moto-s3")
        self._thread.start()

    def stop(self) -> None:
        """Stop as a crashed server would: no listener, every open connection closed."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            live = list(self._connections)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._server is not None

    def client(self) -> Any:
        """The tests' own s3fs filesystem for the server (not the instance the code under test gets
        from fsspec, so no listing cache is shared with it)."""
        if self._client is None:
            import s3fs

            self._client = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        self._client.invalidate_cache()
        return self._client

    def multipart_uploads(self, bucket: str) -> list[dict[str, Any]]:
        return list(self.client().call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []))


_SHARED: S3Server | None = None
_USERS = 0  # each test module that imports the fixture gets its own (session-scoped) instance of it


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[S3Server]:
    """The session's S3 server, with fsspec's ``s3`` configuration pointing at it."""
    import fsspec.config

    global _SHARED, _USERS
    if _SHARED is None:
        _SHARED = S3Server()
        _SHARED.start()
        _SHARED.saved_config = fsspec.config.conf.get("s3")
        fsspec.config.conf["s3"] = _SHARED.storage_options
    _USERS += 1
    server = _SHARED
    try:
        yield server
    finally:
        _USERS -= 1
        if _USERS == 0:
            if server.saved_config is None:
                fsspec.config.conf.pop("s3", None)
            else:
                fsspec.config.conf["s3"] = server.saved_config
            server.stop()
            _SHARED = None


@pytest.fixture(name="s3_bucket")
def s3_bucket_fixture(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket for one test, as ``s3://name``; emptied and deleted afterwards."""
    if not s3_server.running:  # a test that stopped it and failed before restarting it
        s3_server.start()
    s3_server.stop_on = None
    name = f"test-{secrets.token_hex(4)}"
    fs = s3_server.client()
    fs.call_s3("create_bucket", Bucket=name)
    try:
        yield f"s3://{name}"
    finally:
        if not s3_server.running:
            s3_server.start()
        s3_server.stop_on = None
        with contextlib.suppress(Exception):
            for upload in s3_server.multipart_uploads(name):
                fs.call_s3("abort_multipart_upload", Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
            fs.rm(name, recursive=True)
