"""The `rollback_champion` job, executed as an operator launches it, on a tmp MLflow registry.

The aliases' own rules (promotion, compare-and-swap, crash safety) are tested at the resource
level in test_promotion.py; here: the job wires config and resource to them, restores the old
champion, records it, and fails clearly when there is nothing to roll back.
"""

import dagster as dg

# Fixtures of the resource-level tests: a tmp SQLite store, and a model named after the test with 3 versions.
from test_promotion import Registry, registry, store  # noqa: F401

from resources.mlflow_tracking import CHAMPION, PREVIOUS
from trace_dagster.jobs import rollback_champion


def run_rollback(model: Registry, expected_champion: str = "") -> dg.ExecuteInProcessResult:
    config = {"model_name": model.name, "expected_champion": expected_champion}
    return rollback_champion.execute_in_process(
        resources={"mlflow_tracking": model.tracking},
        run_config={"ops": {"rollback_registered_model": {"config": config}}},
        raise_on_error=False,
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    [failure] = [e for e in result.all_events if e.is_step_failure]
    return failure.step_failure_data.error.message


def test_rollback_restores_the_previous_champion_once(registry):  # noqa: F811
    registry.promote(1, 0.80, None)
    registry.promote(2, 0.85, 0.80)  # v2 promoted over v1
    assert registry.aliases() == {CHAMPION: "2", PREVIOUS: "1"}

    result = run_rollback(registry)
    assert result.success
    assert registry.aliases() == {CHAMPION: "1"}
    assert registry.champions() == ["1"]
    [observation] = result.asset_observations_for_node("rollback_registered_model")
    assert observation.asset_key == dg.AssetKey("model_promotion")
    assert observation.metadata["champion"].value == "1" and observation.metadata["demoted"].value == "2"

    again = run_rollback(registry)  # a second launch must not bring v2 back
    assert not again.success
    message = failure_message(again)
    assert "nothing rolled back" in message and "no previous version" in message
    assert registry.aliases() == {CHAMPION: "1"}


def test_rollback_of_a_champion_that_changed_meanwhile_fails_and_changes_nothing(registry):  # noqa: F811
    registry.promote(1, 0.80, None)
    registry.promote(2, 0.85, 0.80)
    result = run_rollback(registry, expected_champion="1")  # the operator saw v1 as champion
    assert not result.success
    assert "not v1" in failure_message(result)
    assert registry.aliases() == {CHAMPION: "2", PREVIOUS: "1"}
    assert run_rollback(registry, expected_champion="2").success
    assert registry.aliases() == {CHAMPION: "1"}


def test_rollback_of_an_unregistered_model_fails_clearly(store):  # noqa: F811
    result = run_rollback(Registry(store, "never_registered"))
    assert not result.success
    assert "no previous version" in failure_message(result)
