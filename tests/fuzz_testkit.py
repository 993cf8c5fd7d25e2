"""Fuzzing an app from its OpenAPI schema (schemathesis, a dev dependency): every
operation with positive and negative cases; answers must be documented, and no 5xx
except the ones the caller names as documented."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance


def schema_failures(
    schema: dict[str, Any],
    url: str,
    token: str,
    *,
    max_examples: int,
    documented_5xx: Callable[[Any, Any], bool] = lambda response, case: False,
) -> list[str]:
    """The failures found per operation (an empty list when the app holds up)."""

    def server_error(ctx, response, case):
        if documented_5xx(response, case):
            return None
        return not_a_server_error(ctx, response, case)

    checks = [server_error, response_schema_conformance, content_type_conformance]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    auth = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    for operation in schemathesis.openapi.from_dict(schema).get_all_operations():
        operation = operation.ok()
        cases = st.one_of([operation.as_strategy(generation_mode=mode) for mode in modes])

        @hsettings(max_examples=max_examples, deadline=None, phases=[Phase.generate],
                   database=None, suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=cases)
        def check(case):
            response = case.call(base_url=url, headers=auth, timeout=30)
            case.validate_response(response, checks=checks)

        try:
            check()
        except Exception as error:  # collect every operation's failure, then report
            failures.append(f"{operation.label}: {error}"[:3000])
    return failures
