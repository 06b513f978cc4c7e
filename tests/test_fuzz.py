"""Schema-driven fuzzing: Schemathesis generates valid and invalid requests for every operation in the served
OpenAPI document and checks each response against it: never a 5xx, and status, content type and body shape
as documented (errors included). A bounded number of examples per operation keeps it inside `make test`."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schema fuzzing needs schemathesis (in the `test` extra)")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.main import create_app  # noqa: E402
from app.services import Models, load_pipeline  # noqa: E402
from app.settings import load_settings  # noqa: E402

CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)
EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def fuzzed_app(example_index):
    # the answer endpoints run extractively with the shipped reader: real answers, fast enough to fuzz
    settings = load_settings(
        bundle=example_index,
        reranker={"model": None},
        generator={"backend": "none"},
        answer={"mode": "extractive"},
    )
    models = Models().warm_up(settings, generator=False)
    pipeline = load_pipeline(settings, example_index, models)
    return create_app(pipeline=pipeline, reader=models.reader)


def test_every_operation_answers_as_documented(fuzzed_app):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    api = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
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
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
