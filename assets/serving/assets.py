"""`user_embeddings`: the latest embedding of every user from the `champion` TRACE version.

The model is loaded back from the MLflow registry (`models:/trace/<champion>`), the same path a
serving process takes, so a registry that cannot serve breaks this asset, not production. Rows
of other model versions stay in the table (one row per user and version, contract.md), so a
rollback finds its embeddings already there.
"""

import base64
import io
from datetime import timedelta

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common.metadata import warehouse_table_metadata
from assets.model_registry.assets import PROMOTION_KEY
from assets.serving.columns import USER_EMBEDDINGS_COLUMNS
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse, table_exists

GROUP = "serving"
OWNERS = ["team:ml-platform"]
MODEL_NAME = "trace"


class EmbeddingMapConfig(dg.Config):
    map_users: int = Field(default=2000, description="Users drawn (seeded) for the t-SNE map.")
    seed: int = 0


def dominant_behaviour(events: pd.DataFrame, top: int = 7) -> pd.Series:
    """Each user's most frequent event name (the rarer names pooled as `other`): the map's colours."""
    counts = events.groupby(["user_id", "event_name"], observed=True).size().rename("n").reset_index()
    best = counts.sort_values(["user_id", "n", "event_name"], ascending=[True, False, True]).drop_duplicates("user_id")
    behaviour = best.set_index("user_id")["event_name"].astype(str)
    common = behaviour.value_counts().index[:top]
    return behaviour.where(behaviour.isin(common), "other")


def embedding_map_png(embeddings: np.ndarray, labels: pd.Series, title: str, seed: int = 0) -> bytes:
    """t-SNE of the embeddings, one colour per behaviour, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(embeddings) - 1) // 3)))
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    for name in sorted(labels.unique()):
        sel = (labels == name).to_numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, label=f"{name} ({sel.sum()})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=8, title="most frequent event", loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"duckdb", "mlflow", "pytorch"},
    deps=["sessionized_events", PROMOTION_KEY],
    pool=WAREHOUSE_POOL,
    description="Latest embedding per user from the champion TRACE version (loaded from the MLflow "
    "registry), with a t-SNE map coloured by behaviour.",
)
def user_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingMapConfig,
    warehouse: DuckDBWarehouse,
    paths: TraceDagsterPaths,
    mlflow_tracking: MLflowTracking,
) -> dg.MaterializeResult:
    version = mlflow_tracking.champion_version(MODEL_NAME)
    if version is None:
        raise dg.Failure(f"registered model `{MODEL_NAME}` has no `champion`: run model_promotion first")
    model = mlflow_tracking.load_model(f"models:/{MODEL_NAME}/{version}")
    with warehouse.connect(read_only=True) as con:
        events = con.sql(
            "SELECT * EXCLUDE (source_file, source_row, ingested_at) FROM sessionized_events "
            "ORDER BY user_id, event_index"
        ).df()
    as_of = (pd.Timestamp(events["event_time"].max()) + timedelta(seconds=1)).to_pydatetime()
    users = pd.DataFrame({"user_id": events["user_id"].drop_duplicates().to_numpy(), "cutoff": as_of})
    vectors = model.embed(events, users)
    frame = pd.DataFrame(
        {
            "user_id": users["user_id"].astype(str),
            "model_name": MODEL_NAME,
            "model_version": str(version),
            "embedding": [v.astype(np.float32).tolist() for v in vectors],
            "as_of": as_of,
        }
    )
    with warehouse.connect() as con:
        con.register("new_embeddings", frame)
        keep_others = ""
        if table_exists(con, "user_embeddings"):
            keep_others = (
                f"UNION ALL SELECT user_id, model_name, model_version, embedding, as_of FROM user_embeddings "
                f"WHERE NOT (model_name = '{MODEL_NAME}' AND model_version = '{version}')"
            )
        rows = warehouse.replace_table(
            con,
            "user_embeddings",
            f"SELECT user_id, model_name, model_version, CAST(embedding AS FLOAT[]) AS embedding, as_of "
            f"FROM new_embeddings {keep_others}",
        )
        catalog = warehouse_table_metadata(con, "user_embeddings", USER_EMBEDDINGS_COLUMNS)

    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.choice(len(frame), size=min(config.map_users, len(frame)), replace=False))
    behaviour = dominant_behaviour(events).reindex(frame["user_id"].iloc[pick]).fillna("other").reset_index(drop=True)
    png = embedding_map_png(
        vectors[pick], behaviour, f"TRACE v{version} user embeddings (t-SNE, {len(pick)} users)", config.seed
    )
    png_path = paths.reports_dir / f"user_embeddings_map-trace-v{version}.png"
    png_path.write_bytes(png)
    return dg.MaterializeResult(
        metadata={
            **catalog,
            "dagster/row_count": rows,
            "users": len(frame),
            "model_version": str(version),
            "as_of": str(as_of),
            "embedding_dim": int(vectors.shape[1]),
            "map_path": dg.MetadataValue.path(str(png_path)),
            "map": dg.MetadataValue.md(f"![user embeddings](data:image/png;base64,{base64.b64encode(png).decode()})"),
        }
    )


@dg.asset_check(asset=user_embeddings, description="One finite embedding per user for the champion version.")
def user_embeddings_are_complete(warehouse: DuckDBWarehouse, mlflow_tracking: MLflowTracking) -> dg.AssetCheckResult:
    version = mlflow_tracking.champion_version(MODEL_NAME)
    with warehouse.connect(read_only=True) as con:
        users = con.execute("SELECT count(DISTINCT user_id) FROM sessionized_events").fetchall()[0][0]
        rows, distinct, bad = con.execute(
            "SELECT count(*), count(DISTINCT user_id), "
            "count(*) FILTER (list_bool_or(list_transform(embedding, lambda x: isnan(x) OR isinf(x)))) "
            f"FROM user_embeddings WHERE model_name = '{MODEL_NAME}' AND model_version = ?",
            [str(version)],
        ).fetchall()[0]
    return dg.AssetCheckResult(
        passed=rows == distinct == users and bad == 0,
        metadata={"users": users, "rows": rows, "non_finite": bad, "model_version": str(version)},
    )
