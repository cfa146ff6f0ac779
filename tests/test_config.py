"""Profiles load, inherit, and reject unknown keys / wrong types with the key named."""

from __future__ import annotations

import pytest

from distill.config import load_config
from distill.errors import ConfigError


def test_profiles_load() -> None:
    local, cluster, ci = load_config("local"), load_config("cluster"), load_config("local_ci")
    assert (local.profile, cluster.profile, ci.profile) == ("local", "cluster", "local")
    assert ci.name == "local_ci" and ci.data.num_to_label < local.data.num_to_label
    assert ci.models == local.models  # inherited unchanged
    assert "HF_TOKEN" in cluster.required_env and not local.required_env
    assert cluster.data.num_to_label is None and cluster.data.test_size is None


def test_default_profile_is_local(monkeypatch) -> None:
    monkeypatch.delenv("DISTILL_PROFILE", raising=False)
    assert load_config().name == "local"


def _write(tmp_path, text: str):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_key_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'data\.num_gloden'"):
        load_config(_write(tmp_path, "extends: local\ndata:\n  num_gloden: 3\n"))


def test_wrong_type_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"key 'data\.num_gold'.*'lots'"):
        load_config(_write(tmp_path, "extends: local\ndata:\n  num_gold: lots\n"))
    with pytest.raises(ConfigError, match=r"key 'profile'"):
        load_config(_write(tmp_path, "extends: local\nprofile: laptop\n"))


def test_a_rule_across_keys_is_one_line_naming_both(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"p\.yaml: curation\.min_confidence needs teacher\.strategy vote_llm .*not knn$"):
        load_config(_write(tmp_path, "extends: local\nteacher: {strategy: knn}\ncuration: {min_confidence: 0.5}\n"))


def test_missing_and_malformed(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_profile")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="missing key 'models'"):
        load_config(_write(tmp_path, "profile: local\nartifacts_dir: x\n"))
