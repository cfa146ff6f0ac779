"""The cascade app's arguments (issue 31): the program app's plus a `cascade` block; a missing or unknown
setting is a clear error when the application is built, before anything is deployed."""

from __future__ import annotations

import pytest

from distill.serving.cascade import build_app

ARGS = {"deploy_params": "deploy_params.json", "llm_api_base": "http://127.0.0.1:8000/v1"}
CASCADE = {"cascade_params": "cascade.json", "teacher_url": "http://127.0.0.1:8000/teacher"}


def test_a_complete_config_builds() -> None:
    app = build_app({**ARGS, "cascade": CASCADE})
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize("args, needle", [
    ({**ARGS}, "cascade"),
    ({**ARGS, "cascade": {"teacher_url": "http://x"}}, "cascade.cascade_params"),
    ({**ARGS, "cascade": {**CASCADE, "teacher_timeout_s": 0}}, "teacher_timeout_s"),
    ({**ARGS, "cascade": {**CASCADE, "threshold": 0.5}}, "threshold"),  # belongs in cascade.json, not here
])
def test_bad_configs_are_clear_errors(args, needle) -> None:
    with pytest.raises(ValueError, match="distill.serving.cascade:build_app") as e:
        build_app(args)
    assert needle in str(e.value)
