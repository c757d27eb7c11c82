"""docs/openapi.yaml is a valid description, covers every route Ember serves,
and holds under a bounded schemathesis run against a real `ember --api-sock`
(no 5xx, no hang, no crash, every answer as documented)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ember.api.routes import ROUTES, UNSUPPORTED_DEVICES
from test_api_support import CHECKER, OPENAPI_PATH, ember_process

SCHEMATHESIS_BUDGET_S = 45.0
EXAMPLES_PER_OPERATION = 25


def test_the_description_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    validate(yaml.safe_load(OPENAPI_PATH.read_text()))


def test_every_route_is_documented() -> None:
    for method, path in ROUTES:
        assert CHECKER.operation(method, path) is not None, f"{method} {path}"
    for path in UNSUPPORTED_DEVICES:
        concrete = path + "some-id" if path.endswith("/") else path
        if path in ("/balloon/", "/mmds/"):
            continue  # prefixes of documented sub-resources
        assert CHECKER.operation("PUT", concrete) or CHECKER.operation("GET", concrete)


def test_every_documented_operation_is_routed() -> None:
    document = yaml.safe_load(OPENAPI_PATH.read_text())
    for template, item in document["paths"].items():
        for method in ("get", "put", "patch"):
            if method not in item:
                continue
            if (method.upper(), template) in ROUTES:
                continue
            concrete = template.replace("{", "").replace("}", "")
            from ember.api.routes import unsupported_device

            assert unsupported_device(concrete), f"{method} {template} is not served"


def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    pytest.importorskip("requests_unixsocket")
    from schemathesis.specs.openapi import checks as openapi_checks

    schema = schemathesis.openapi.from_path(str(OPENAPI_PATH))
    chosen_checks = [
        schemathesis.checks.not_a_server_error,
        openapi_checks.status_code_conformance,
        openapi_checks.content_type_conformance,
        openapi_checks.response_schema_conformance,
    ]
    started = time.monotonic()
    with ember_process(tmp_path, "--id", "fuzz") as ember:
        session = unix_socket_session(ember.socket_path)
        base_url = "http://ember.invalid"
        operations = [result.ok() for result in schema.get_all_operations()]
        budget = SCHEMATHESIS_BUDGET_S / len(operations)
        for operation in operations:
            deadline = time.monotonic() + budget
            fuzz = fuzz_test(operation, base_url, session, chosen_checks, deadline)
            fuzz()
            assert ember.alive(), f"ember died during {operation.label}"
        session.close()
        assert len(set(SENT)) == len(operations)  # every operation was exercised
        assert len(SENT) > 5 * len(operations)
        client = ember.client()
        assert client.get("/").status == 200
        client.close()
    assert time.monotonic() - started < SCHEMATHESIS_BUDGET_S * 2


SENT: list[str] = []


def fuzz_test(
    operation: Any, base_url: str, session: Any, checks: list[Any], deadline: float
) -> Callable[[], None]:
    """A hypothesis test sending `operation`'s generated cases until `deadline`."""
    from hypothesis import HealthCheck, Phase, given, settings

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    def fuzz(case: Any) -> None:
        # The budget bounds the run, but every operation gets a few cases even on
        # a loaded machine where generating them ate its share of the time.
        if time.monotonic() > deadline and SENT.count(operation.label) >= 3:
            return
        SENT.append(operation.label)
        case.call_and_validate(
            base_url=base_url, session=session, checks=checks, timeout=10
        )

    return fuzz


def unix_socket_session(socket_path: Path) -> Any:
    """A requests session whose every http:// URL reaches `socket_path`."""
    from urllib.parse import quote

    import requests
    from requests_unixsocket.adapters import UnixAdapter, UnixHTTPConnectionPool

    class OneSocketAdapter(UnixAdapter):  # type: ignore[misc]
        def get_connection(self, url: str, proxies: Any = None) -> Any:
            return self.pool

    adapter = OneSocketAdapter()
    adapter.pool = UnixHTTPConnectionPool(
        "http+unix://" + quote(str(socket_path), safe=""), timeout=10
    )
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment
    session.mount("http://", adapter)
    return session
