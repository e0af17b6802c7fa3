"""Schemathesis against a live memvisor VMM, straight over its Unix API socket.

Run by .ci/api-fuzz.sh (which starts the VMM and sets MEMVISOR_API_SOCKET); the tests run in
file order:

1. every operation but those that end or reset the VM and the endless event stream, with
   positive and negative data in the examples, coverage and fuzzing phases: no 5xx, statuses,
   content types and bodies as documented, schema-violating requests refused, undocumented
   methods answered 405 with `Allow`;
2. power-off with schema-violating bodies only (each must be refused: a valid one would press
   the power button);
3. the event stream: its head, and an event for a resize, each line an `Event`;
4. reboot, called last, once: `boots` goes up by one;
5. the VMM still answers.

Environment: MEMVISOR_API_SOCKET (required), MEMVISOR_OPENAPI (default docs/api/openapi.json),
MEMVISOR_FUZZ_EXAMPLES (examples per operation and phase, default 40),
MEMVISOR_FUZZ_SKIP_CHECKS (checks to leave out, by name).
"""

import json
import os
import socket
import time
from pathlib import Path

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

SOCKET = os.environ["MEMVISOR_API_SOCKET"]
ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = Path(os.environ.get("MEMVISOR_OPENAPI", ROOT / "docs/api/openapi.json"))
EXAMPLES = int(os.environ.get("MEMVISOR_FUZZ_EXAMPLES", "40"))
# Any host: the session below sends every request to the socket.
BASE_URL = "http://memvisor"
# MEMVISOR_FUZZ_SKIP_CHECKS (comma-separated names) leaves checks out, e.g. while a known
# disagreement is being fixed.
SKIPPED = set(filter(None, os.environ.get("MEMVISOR_FUZZ_SKIP_CHECKS", "").split(",")))
CHECKS = [
    check
    for check in [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
        unsupported_method,
    ]
    if check.__name__ not in SKIPPED
]
# Reset or end the VM (called once, last, or never), or never end (the event stream).
NOT_FUZZED = ["rebootVm", "powerOffVm", "shutdownVmm", "streamEvents"]


def unix_session(path: str) -> requests.Session:
    """A requests session whose every http:// connection is to the Unix socket `path`."""

    class Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if isinstance(self.timeout, (int, float)):
                sock.settimeout(self.timeout)
            sock.connect(path)
            return sock

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool}

    session = requests.Session()
    session.mount("http://", Adapter())
    return session


SESSION = unix_session(SOCKET)
DOC = json.loads(DOCUMENT.read_text())

schema = schemathesis.openapi.from_path(str(DOCUMENT))
schema.config.generation.update(modes=["positive", "negative"], max_examples=EXAMPLES)
fuzzed = schema.exclude(operation_id=NOT_FUZZED)
power_off = schema.include(operation_id="powerOffVm")

HYPOTHESIS = settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def api(method: str, path: str, body=None, timeout: float = 10) -> requests.Response:
    return SESSION.request(method, BASE_URL + path, json=body, timeout=timeout)


@fuzzed.parametrize()
@HYPOTHESIS
def test_operations(case):
    case.call_and_validate(base_url=BASE_URL, session=SESSION, checks=CHECKS, timeout=10)


def _valid_power_off_body(body) -> bool:
    """Whether `body` (or no body) would press the power button."""
    if not isinstance(body, dict):
        return body is None or body is NOT_SET
    extra = set(body) - {"timeout_s"}
    timeout = body.get("timeout_s", 30)
    return not extra and type(timeout) is int and 1 <= timeout <= 600


@power_off.parametrize()
@HYPOTHESIS
def test_power_off_refuses_bad_bodies(case):
    if _valid_power_off_body(case.body):
        return
    response = case.call(base_url=BASE_URL, session=SESSION, timeout=10)
    case.validate_response(response, checks=CHECKS)
    assert 400 <= response.status_code < 500, (case.body, response.status_code, response.text)


def _event_validator():
    return jsonschema_rs.validator_for(DOC["components"]["schemas"]["Event"])


def test_events_stream_a_resize():
    """The stream's head, and the `size-requested` event of a resize, every line an Event."""
    validator = _event_validator()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(SOCKET)
    sock.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: memvisor\r\n\r\n")
    stream = sock.makefile("rb")
    try:
        status = stream.readline().decode()
    except TimeoutError:
        pytest.fail("no answer head within 10 s: the stream must be sent as it happens, not buffered")
    headers = {}
    while (line := stream.readline().decode().strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert status.split()[1] == "200", status
    assert headers.get("content-type", "").startswith("application/x-ndjson"), headers
    assert "chunked" in headers.get("transfer-encoding", ""), headers
    memory = api("GET", "/api/v1/memory").json()
    device = memory["devices"][0]
    size = device["block_size"] * 3
    assert api("PUT", f"/api/v1/memory/{device['id']}", {"requested_size": size}).status_code == 204
    pending = b""
    deadline = time.monotonic() + 10
    seen = []
    while time.monotonic() < deadline:
        chunk_head = stream.readline()
        assert chunk_head, f"the stream ended; events: {seen}"
        length = int(chunk_head.split(b";")[0], 16)
        assert length > 0, f"the stream ended with the last chunk; events: {seen}"
        pending += stream.read(length)
        assert stream.read(2) == b"\r\n"
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue  # the keep-alive
            event = json.loads(line)
            validator.validate(event)
            seen.append(event)
            if event["event"] == "size-requested":
                sock.close()
                return
    pytest.fail(f"no size-requested event within 10 s; events: {seen}")


def test_reboot_boots_again():
    before = api("GET", "/api/v1/vm").json()["boots"]
    response = api("PUT", "/api/v1/vm/reboot")
    assert response.status_code == 204, response.text
    deadline = time.monotonic() + 10
    while api("GET", "/api/v1/vm").json()["boots"] != before + 1:
        assert time.monotonic() < deadline, "boots did not go up within 10 s"
        time.sleep(0.05)


def test_the_vmm_still_answers():
    vm = api("GET", "/api/v1/vm")
    assert vm.status_code == 200, vm.text
    if vm.json()["state"] == "paused":
        assert api("PUT", "/api/v1/vm/resume").status_code == 204
    assert api("GET", "/api/v1/vm").json()["state"] == "running"
    assert api("GET", "/api/v1/memory").status_code == 200
