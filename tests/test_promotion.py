"""Gated promotion, rollback and crash safety of the `champion` / `previous` aliases."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from mlflow import MlflowClient

from assets.model_registry.policy import promote_if_better
from resources.mlflow_tracking import CHAMPION, PREVIOUS, MLflowTracking

CONTEXT = {"metric": "auroc", "split": "test", "n_examples": 400}


@dataclass
class Registry:
    """One registered model of the shared store, with the calls the tests make on it."""

    tracking: MLflowTracking
    name: str

    def promote(self, version, score, champion_score, checks_passed=True, margin=0.01):
        return promote_if_better(
            self.tracking,
            self.name,
            version,
            score,
            champion_score,
            margin=margin,
            checks_passed=checks_passed,
            reason_context=CONTEXT,
        )

    def rollback(self, **kwargs):
        return self.tracking.rollback(self.name, **kwargs)

    def aliases(self) -> dict[str, str]:
        return self.tracking.aliases(self.name)

    def tags(self, version) -> dict[str, str]:
        return self.tracking.client().get_model_version(self.name, str(version)).tags

    def champions(self) -> list[str]:
        """Versions that carry the champion alias, read version by version (not from one mapping).

        get_model_version, not search_model_versions: in MLflow 3.17 the latter returns no aliases.
        """
        client = self.tracking.client()
        numbers = [str(v.version) for v in client.search_model_versions(f"name='{self.name}'")]
        return sorted(n for n in numbers if CHAMPION in client.get_model_version(self.name, n).aliases)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> MLflowTracking:
    """One SQLite store for the module: creating its schema takes seconds, a model name does not."""
    tracking = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")
    tracking.ensure_store()
    return tracking


@pytest.fixture
def registry(store, request, tmp_path: Path) -> Registry:
    """A model named after the test, with three versions and no aliases yet."""
    name = "trace_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    client = store.client()
    client.create_registered_model(name)
    for i in range(3):
        source = tmp_path / f"model{i}"
        source.mkdir()
        client.create_model_version(name, source=str(source))
    return Registry(store, name)


def test_first_version_becomes_champion(registry):
    decision = registry.promote(1, 0.80, None)
    assert decision.promoted and decision.champion_version == "1" and decision.previous_version is None
    assert registry.tracking.champion_version(registry.name) == "1"
    assert registry.champions() == ["1"]


def test_worse_or_marginal_challenger_never_takes_champion(registry):
    registry.promote(1, 0.80, None)
    worse = registry.promote(2, 0.75, 0.80)
    within_margin = registry.promote(3, 0.805, 0.80)  # better, but not by the 0.01 margin
    for decision in (worse, within_margin):
        assert not decision.promoted
        assert decision.champion_version == "1"
    assert worse.delta == pytest.approx(-0.05) and within_margin.delta == pytest.approx(0.005)
    assert registry.aliases() == {CHAMPION: "1"}


def test_better_challenger_takes_champion_and_old_one_becomes_previous(registry):
    registry.promote(1, 0.80, None)
    decision = registry.promote(2, 0.85, 0.80)
    assert decision.promoted
    assert (decision.champion_version, decision.previous_version) == ("2", "1")
    assert decision.delta == pytest.approx(0.05)
    assert registry.aliases() == {CHAMPION: "2", PREVIOUS: "1"}
    assert registry.champions() == ["2"]


def test_failed_check_blocks_promotion_whatever_the_score(registry):
    first = registry.promote(1, 0.99, None, checks_passed=False)
    assert not first.promoted and registry.aliases() == {}
    registry.promote(1, 0.80, None)
    decision = registry.promote(2, 0.99, 0.80, checks_passed=False)
    assert not decision.promoted and "check" in decision.reason
    assert registry.aliases() == {CHAMPION: "1"}


def test_champion_without_a_comparable_score_is_kept(registry):
    registry.promote(1, 0.80, None)
    decision = registry.promote(2, 0.99, None)
    assert not decision.promoted and registry.aliases() == {CHAMPION: "1"}


def test_decisions_are_recorded_as_version_tags(registry):
    registry.promote(1, 0.80, None)
    registry.promote(2, 0.70, 0.80)
    registry.promote(3, 0.90, 0.80)
    rejected, promoted = registry.tags(2), registry.tags(3)
    assert rejected["promotion.decision"] == "rejected"
    assert float(rejected["promotion.delta"]) == pytest.approx(-0.1)
    assert "margin" in rejected["promotion.reason"]
    assert rejected["promotion.champion_at_decision"] == "1"
    assert promoted["promotion.decision"] == "promoted"
    assert float(promoted["promotion.delta"]) == pytest.approx(0.1)
    assert json.loads(promoted["promotion.context"]) == CONTEXT
    assert datetime.fromisoformat(promoted["promotion.decided_at"]).tzinfo is not None
    assert registry.tags(1)["promotion.superseded_by"] == "3"
    again = registry.promote(3, 0.90, 0.90)  # the champion as its own challenger: no decision
    assert not again.promoted and registry.tags(3)["promotion.decision"] == "promoted"
    metadata = registry.promote(2, 0.70, 0.90).as_metadata()
    assert metadata["promoted"] is False and metadata["challenger_version"] == "2"
    assert all(value is not None for value in metadata.values())


def test_rollback_restores_previous_and_cannot_reinstate_the_bad_version(registry):
    registry.promote(1, 0.80, None)
    registry.promote(2, 0.85, 0.80)
    mismatch = registry.rollback(expected_champion="1")
    assert not mismatch.rolled_back and registry.aliases() == {CHAMPION: "2", PREVIOUS: "1"}

    result = registry.rollback(expected_champion="2")
    assert result.rolled_back
    assert (result.champion_version, result.demoted_version, result.previous_version) == ("1", "2", None)
    assert registry.aliases() == {CHAMPION: "1"}
    tags = registry.tags(2)
    assert tags["promotion.rolled_back_to"] == "1" and "promotion.rolled_back_at" in tags

    again = registry.rollback()  # a second click must not bring version 2 back
    assert not again.rolled_back and registry.aliases() == {CHAMPION: "1"}


class _Crash(RuntimeError):
    pass


def _crash_on_call(monkeypatch, method_name: str, fail_on_call: int) -> None:
    """Make MlflowClient.<method_name> raise on its n-th call, as if the process died there."""
    original = getattr(MlflowClient, method_name)
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise _Crash(f"simulated crash in {method_name} call {fail_on_call}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method_name, flaky)


@pytest.mark.parametrize("fail_on_call", [1, 2], ids=["before-any-alias-write", "between-alias-writes"])
def test_interrupted_promotion_leaves_exactly_one_champion(registry, monkeypatch, fail_on_call):
    registry.promote(1, 0.80, None)
    registry.promote(2, 0.85, 0.80)  # champion 2, previous 1
    _crash_on_call(monkeypatch, "set_registered_model_alias", fail_on_call)
    with pytest.raises(_Crash):
        registry.promote(3, 0.95, 0.85)
    monkeypatch.undo()

    assert registry.champions() == ["2"]  # the old champion is still served, and only it
    assert registry.tags(3)["promotion.decision"] == "promoting"  # the interruption is visible
    decision = registry.promote(3, 0.95, 0.85)  # re-running the same decision completes it
    assert decision.promoted and registry.aliases() == {CHAMPION: "3", PREVIOUS: "2"}
    assert registry.champions() == ["3"]


def test_interrupted_rollback_leaves_exactly_one_champion(registry, monkeypatch):
    registry.promote(1, 0.80, None)
    registry.promote(2, 0.85, 0.80)
    _crash_on_call(monkeypatch, "delete_registered_model_alias", 1)
    with pytest.raises(_Crash):
        registry.rollback()
    monkeypatch.undo()
    assert registry.champions() == ["1"]
    assert registry.rollback().rolled_back is False  # previous == champion: nothing left to undo
    assert registry.aliases()[CHAMPION] == "1"
