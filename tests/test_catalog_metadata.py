"""Asset metadata drawn one way: markdown tables, column schemas and previews for the catalog."""

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
from helpers import materialize_pipeline, pipeline_resources

from assets.common.metadata import column_schema, markdown_table, warehouse_table_metadata


def test_markdown_table_keeps_one_row_per_line_and_formats_floats():
    frame = pd.DataFrame({"model": ["trace", "lstm"], "auroc": [0.712345, np.nan], "raw": ["a|b\nc", "+0.50"]})
    lines = markdown_table(frame, floatfmt=".4f").splitlines()
    assert len(lines) == 4  # header, rule, two rows: the newline inside a cell did not split a row
    assert "0.7123" in lines[2] and "a\\|b c" in lines[2]  # escaped pipe, one line
    assert "n/a" in lines[3] and "+0.50" in lines[3]  # NaN drawn as missing, text kept as written
    assert markdown_table(frame.head(0)) == "_(none)_"


def test_column_schema_types_and_descriptions_with_globs():
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT 1::BIGINT AS n, 'x' AS label_buy, [1.0]::FLOAT[] AS e")
    schema = column_schema(con.sql("SELECT * FROM t"), {"n": "a count", "label_*": "a label"})
    assert [(c.name, c.type, c.description) for c in schema.columns] == [
        ("n", "BIGINT", "a count"),
        ("label_buy", "VARCHAR", "a label"),
        ("e", "FLOAT[]", None),  # undescribed columns stay visible as such
    ]
    empty = warehouse_table_metadata(con, "t", {}, preview_rows=1, preview_sql="SELECT * FROM t WHERE false")
    assert empty["dagster/row_count"] == 1 and isinstance(empty["preview"], dg.TableMetadataValue)


def test_ingested_tables_report_described_columns_and_a_preview(home):
    resources = pipeline_resources(home, simulator_n_users=40, simulator_days=7, simulator_seed=3)
    result = materialize_pipeline(resources)
    metadata = {
        e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()
    }
    assert set(metadata) == {"raw_events", "rejected_events", "sessionized_events"}
    for key, entries in metadata.items():
        columns = entries["dagster/column_schema"].schema.columns
        assert [c.name for c in columns if not c.description] == [], key
        assert entries["dagster/row_count"].value >= 0
    sessionized = {c.name: c.type for c in metadata["sessionized_events"]["dagster/column_schema"].schema.columns}
    assert sessionized["session_index"] == "INTEGER" and sessionized["event_time"].startswith("TIMESTAMP")
    for key in ("raw_events", "sessionized_events"):
        preview = metadata[key]["preview"]
        assert isinstance(preview, dg.TableMetadataValue) and len(preview.records) > 0, key
