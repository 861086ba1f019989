"""The OpenAPI document stays accurate: schemathesis fuzzes every operation of the live app.

Checks: no 5xx, every status code and content type is documented, and every response body
matches its documented schema. Examples are bounded (this runs in the default suite).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from tests.service.conftest import make_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_app(tmp_path_factory: pytest.TempPathFactory, bundle_a: Path, catalog) -> Iterator:  # noqa: ANN001
    from tests.service.helpers import write_version

    root = tmp_path_factory.mktemp("openapi") / "index"
    write_version(root, bundle_a, catalog[0], catalog[1])
    app = create_app(make_settings(root, max_batch=4), start_reloader=False)
    with TestClient(app):  # runs the lifespan (cache) for the whole module
        if app.state.service.reloader.check_once() != "swapped":
            raise AssertionError(app.state.service.reloader.last_error)
        yield app


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_openapi_document(live_app, mode: GenerationMode) -> None:  # noqa: ANN001
    schema = schemathesis.openapi.from_asgi("/openapi.json", live_app)
    strategy = schema.as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:  # noqa: ANN001
        case.call_and_validate(checks=CHECKS)

    run()
