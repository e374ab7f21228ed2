"""`full_pipeline` with every step in its own Kubernetes pod: dagster-k8s's `k8s_job_executor`.

Optional: `pip install -e .[k8s]` (dagster-k8s 0.29.27, the integration release of dagster
1.13.27). Not in the default Definitions, so the code location loads without it. Deploy with the
Dagster Helm chart (run launcher `K8sRunLauncher`), an image of this repository, and
`TRACE_DAGSTER_HOME` on a ReadWriteMany volume that every step pod mounts: the warehouse's parquet
files and its DuckDB catalog stay one store, and the `warehouse` pool (limit 1) still serialises
its writers across pods. `K8S_RUN_CONFIG` is validated by Dagster in tests/test_k8s_config.py.
"""

import dagster as dg

K8S_NAMESPACE = "trace-dagster"
HOME_VOLUME = "trace-dagster-home"  # a PersistentVolumeClaim, ReadWriteMany

K8S_RUN_CONFIG: dict = {
    "execution": {
        "config": {
            "job_namespace": K8S_NAMESPACE,
            "max_concurrent": 8,  # pods at once; the `warehouse` pool still admits one writer
            "env_vars": [
                "TRACE_DAGSTER_HOME",
                "TRACE_DAGSTER_EVENTS",
                "TRACE_DAGSTER_EVENTS_FORMAT",
                "MLFLOW_TRACKING_URI",
            ],
            "volume_mounts": [{"name": HOME_VOLUME, "mount_path": "/data/trace_dagster"}],
            "volumes": [{"name": HOME_VOLUME, "persistent_volume_claim": {"claim_name": HOME_VOLUME}}],
            "step_k8s_config": {
                "container_config": {
                    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}}
                }
            },
        }
    }
}


def k8s_full_pipeline_job(name: str = "full_pipeline_k8s"):
    """`full_pipeline`'s selection on the k8s executor (needs the `k8s` extra)."""
    from dagster_k8s import k8s_job_executor

    return dg.define_asset_job(
        name,
        selection=dg.AssetSelection.all(),
        executor_def=k8s_job_executor,
        config=K8S_RUN_CONFIG,
        description="Every asset and check, each step a Kubernetes pod (dagster-k8s).",
    )


__all__ = ["K8S_RUN_CONFIG", "k8s_full_pipeline_job"]
