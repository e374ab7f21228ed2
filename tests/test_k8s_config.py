"""The Kubernetes run config of README's "Past one machine" is one that Dagster accepts."""

import copy

import dagster as dg
import pytest

from trace_dagster.k8s import K8S_RUN_CONFIG, k8s_full_pipeline_job

pytest.importorskip("dagster_k8s", reason="the optional extra .[k8s] is not installed")


def resolved_job():
    from trace_dagster.definitions import ASSET_CHECKS, ASSETS, build_resources

    defs = dg.Definitions(
        assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=[k8s_full_pipeline_job()], resources=build_resources()
    )
    return defs.resolve_job_def("full_pipeline_k8s")


def test_k8s_executor_config_is_valid_for_full_pipeline():
    job = resolved_job()
    assert job.executor_def.name == "k8s"
    executor = dg.validate_run_config(job, K8S_RUN_CONFIG)["execution"]["k8s"]  # processed: keyed by executor
    assert executor["job_namespace"] == "trace-dagster" and executor["max_concurrent"] == 8


def test_a_wrong_k8s_config_is_rejected():
    bad = copy.deepcopy(K8S_RUN_CONFIG)
    bad["execution"]["config"]["max_concurrent"] = "eight"
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(resolved_job(), bad)
