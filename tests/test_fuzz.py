"""Schema-driven fuzzing: Schemathesis generates valid and invalid requests for every operation in the served
OpenAPI document and runs every check it has on each response: never a 5xx; status, content type, headers and
body shape as documented (errors included); and the server accepts each request the document allows and
refuses each one it forbids. A bounded number of derandomized examples per operation keeps it inside
`make test` and the same on every run."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schema fuzzing needs schemathesis (in the `test` extra)")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    object_level_authorization,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
)

from app.api.main import create_app  # noqa: E402
from app.settings import load_settings  # noqa: E402
from tests.servers import served_pipeline, wait_ready  # noqa: E402

# every built-in check, including that the server accepts what the document allows (positive_data_acceptance) and
# refuses what it forbids (negative_data_rejection)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
    use_after_free,
    ensure_resource_availability,
    ignored_auth,
    object_level_authorization,
]
EXAMPLES_PER_OPERATION = 20


def documented_settings(example_index):  # noqa: ANN001, ANN201 - also tests/test_api_defects.py's server
    """The server the fuzzer serves: extractive answers with the shipped reader (real answers, fast enough to
    fuzz), MaxSim alone over the stored token vectors as the second stage (so `rerank` and /v1/rerank
    answer, cheaply), and /v1/classify on the real SmolLM2 with small limits (two short texts, 16 tokens read)."""
    return load_settings(
        bundle=example_index,
        reranker={"model": "maxsim", "maxsim": True},
        generator={"backend": "none"},
        answer={"mode": "extractive"},
        classify={"max_texts": 2, "max_text_chars": 200, "max_labels": 8, "max_words": 3},
        index={"tagging": {"max_tokens": 16}},
    )


@pytest.fixture(scope="module")
def fuzzed_app(example_index, tmp_path_factory):
    """The app from settings, served by Schemathesis' ASGI client, which runs its lifespan as a server does
    (models, build, lease, calibration); handed to the fuzzer once `/readyz` answers 200, stopped at the end.
    It serves a copy of the example index: the fuzzer's accepted documents are applied to it."""
    import shutil

    from schemathesis.python import asgi

    index = tmp_path_factory.mktemp("fuzzed") / "index"
    shutil.copytree(example_index, index, symlinks=True)
    app = create_app(documented_settings(index))
    try:
        with asgi.get_client(app) as client:  # starts the app's lifespan, kept until shutdown_lifespans()
            wait_ready(client.get, failed=lambda: app.state.services.load_error)
        yield app
    finally:
        asgi.shutdown_lifespans()


def register_formats(pipeline) -> None:
    """Values of the document's formats for what the server issued: a passage id of the served build, and a
    cursor (one of another build: its 409 is documented; a cursor of this build would be bound to a query)."""
    from hypothesis import strategies as st

    from app.api.ecosystem import PASSAGE_ID_FORMAT
    from app.api.pagination import Cursor, encode_cursor
    from app.api.schemas import CURSOR_FORMAT

    ids = sorted(row[0] for row in pipeline.docstore.passage_rows())
    schemathesis.openapi.format(PASSAGE_ID_FORMAT, st.sampled_from(ids))
    cursors = st.builds(
        Cursor,
        build=st.just("an-earlier-build"),
        collection=st.just("default"),
        offset=st.integers(0, 500),
        depth=st.integers(1, 1000),
        fingerprint=st.text("0123456789abcdef", min_size=16, max_size=16),
    )
    schemathesis.openapi.format(CURSOR_FORMAT, cursors.map(encode_cursor))


def fuzz_config():  # noqa: ANN201 - schemathesis' config type
    """Schemathesis' discovered config, where a request past a documented limit (`maxItems` = a setting such as
    reranker.max_depth) is rejected by the documented 413 ("body or work over a limit"), which counts as a
    rejection beside the default 4xx codes (not a 2xx: an accepted invalid request still fails)."""
    from schemathesis.config import SchemathesisConfig

    config = SchemathesisConfig.discover()
    rejection = config.projects.default.checks.negative_data_rejection
    rejection.expected_statuses = sorted({*rejection.expected_statuses, "413"})  # a new list: not the class default's
    return config


def test_every_operation_answers_as_documented(fuzzed_app):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    app = fuzzed_app
    register_formats(served_pipeline(app))
    api = schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config())
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    failures = []
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for operation, mode in ((op, mode) for op in operations for mode in modes):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case):
            response = case.call()
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label  # no parameters to break
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect every operation's failures
            failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
