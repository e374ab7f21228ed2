"""`user_embeddings`: the latest embedding of every user from the `champion` TRACE version.

Streamed: events come out of DuckDB sorted by user, in batches of whole users
(`scoring.user_batches`), are embedded by the champion and appended to a parquet file, so memory
is bounded by `batch_events`, not by the number of users; the t-SNE map keeps only its sample.

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
from assets.serving.scoring import DEFAULT_BATCH_EVENTS, ParquetStream, user_batches
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse, sql_literal, table_exists

GROUP = "serving"
OWNERS = ["team:ml-platform"]
MODEL_NAME = "trace"


class EmbeddingMapConfig(dg.Config):
    map_users: int = Field(default=2000, description="Users drawn (seeded) for the t-SNE map.")
    seed: int = 0
    batch_events: int = Field(
        default=DEFAULT_BATCH_EVENTS, description="Events embedded per user batch (memory bound)."
    )


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
    rng = np.random.default_rng(config.seed)
    staged = paths.tmp_dir / f"user_embeddings-{context.run.run_id}.parquet"
    stream = ParquetStream(staged)
    with warehouse.connect() as con:
        users, last_time = con.execute(
            "SELECT count(DISTINCT user_id), max(event_time) FROM sessionized_events"
        ).fetchall()[0]
        as_of = (pd.Timestamp(last_time) + timedelta(seconds=1)).to_pydatetime()
        # the t-SNE sample, drawn (seeded) by position in user order before streaming
        pick = set(rng.choice(users, size=min(config.map_users, users), replace=False).tolist()) if users else set()
        picked_ids, picked_vectors, seen = [], [], 0
        reader = con.sql(
            "SELECT * EXCLUDE (source_file, source_row, ingested_at) FROM sessionized_events "
            "ORDER BY user_id, event_index"
        ).to_arrow_reader(100_000)
        for events in user_batches(reader, config.batch_events):
            batch_users = pd.DataFrame({"user_id": events["user_id"].drop_duplicates().to_numpy(), "cutoff": as_of})
            vectors = model.embed(events, batch_users)  # the champion's own encoder: one user batch at a time
            stream.write(
                pd.DataFrame(
                    {
                        "user_id": batch_users["user_id"].astype(str),
                        "model_name": MODEL_NAME,
                        "model_version": str(version),
                        "embedding": list(vectors.astype(np.float32)),
                        "as_of": as_of,
                    }
                )
            )
            for i in range(len(batch_users)):
                if seen + i in pick:
                    picked_ids.append(str(batch_users["user_id"].iloc[i]))
                    picked_vectors.append(vectors[i])
            seen += len(batch_users)
        stream.close()
        keep_others = ""
        if table_exists(con, "user_embeddings"):
            keep_others = (
                f"UNION ALL SELECT user_id, model_name, model_version, embedding, as_of FROM user_embeddings "
                f"WHERE NOT (model_name = '{MODEL_NAME}' AND model_version = '{version}')"
            )
        rows = warehouse.replace_table(
            con,
            "user_embeddings",
            f"SELECT user_id, model_name, model_version, CAST(embedding AS FLOAT[]) AS embedding, "
            f"CAST(as_of AS TIMESTAMP) AS as_of FROM read_parquet({sql_literal(str(staged))}) {keep_others}",
        )
        staged.unlink(missing_ok=True)
        catalog = warehouse_table_metadata(con, "user_embeddings", USER_EMBEDDINGS_COLUMNS)
        con.register("picked_users", pd.DataFrame({"user_id": picked_ids}))
        picked_events = con.sql(
            "SELECT user_id, event_name FROM sessionized_events WHERE user_id IN (SELECT user_id FROM picked_users)"
        ).df()
    vectors = np.stack(picked_vectors) if picked_vectors else np.zeros((0, model.embedding_dim), np.float32)
    behaviour = dominant_behaviour(picked_events).reindex(picked_ids).fillna("other").reset_index(drop=True)
    png = embedding_map_png(
        vectors, behaviour, f"TRACE v{version} user embeddings (t-SNE, {len(vectors)} users)", config.seed
    )
    png_path = paths.reports_dir / f"user_embeddings_map-trace-v{version}.png"
    png_path.write_bytes(png)
    return dg.MaterializeResult(
        metadata={
            **catalog,
            "dagster/row_count": rows,
            "users": int(users),
            "batches_events_at_most": config.batch_events,
            "model_version": str(version),
            "as_of": str(as_of),
            "embedding_dim": int(model.embedding_dim),
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
    passed = rows == distinct == users and bad == 0
    reason = (
        f"{users} users, one finite embedding each"
        if passed
        else f"{rows} rows for {distinct} distinct of {users} users, {bad} non-finite (champion v{version})"
    )
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"reason": reason, "users": users, "rows": rows, "non_finite": bad, "model_version": str(version)},
    )
