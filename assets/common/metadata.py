"""Asset metadata drawn one way: markdown tables, column schemas and table previews.

Why one module: the Dagster catalog shows a warehouse table's columns only if its materialization
carries `dagster/column_schema`, and every asset page reads better when tables look alike. The
column descriptions live beside the SQL of each table (in the asset module that owns it); this
module only turns a DuckDB relation and those descriptions into Dagster metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import date, datetime
from fnmatch import fnmatchcase

import dagster as dg
import duckdb
import numpy as np
import pandas as pd

EMPTY = "_(none)_"
MAX_CELL_CHARS = 80


def _cell(value: object) -> object:
    """A value a markdown or Dagster table cell can hold: numbers stay numbers, the rest is short text."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, datetime | date | pd.Timestamp):
        return str(value)
    text = str(value.tolist() if isinstance(value, np.ndarray) else value)
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def markdown_table(
    frame: pd.DataFrame,
    max_rows: int | None = 10,
    index: bool = False,
    floatfmt: str = "g",
    missing: str = "n/a",
) -> str:
    """A frame as a markdown table (`DataFrame.to_markdown`), for metadata and reports.

    Cells are shortened to one line of at most 80 characters and `|` is escaped, so a raw input
    row cannot break the table; floats are written with `floatfmt`, missing values (None, NaN,
    NaT) as `missing`; strings are never re-parsed as numbers ("+0.50" stays as written).
    """
    if max_rows is not None:
        frame = frame.head(max_rows)
    if frame.empty:
        return EMPTY

    def text(value: object) -> str:
        value = _cell(value)
        if value is None:
            return missing
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value).replace("|", "\\|")

    cells = pd.DataFrame({str(c): [text(v) for v in frame[c]] for c in frame.columns}, index=frame.index)
    return cells.to_markdown(index=index, disable_numparse=True)


def metadata_table(frame: pd.DataFrame, max_rows: int | None = 10, **kwargs) -> dg.MetadataValue:
    """`markdown_table` wrapped as Dagster metadata."""
    return dg.MetadataValue.md(markdown_table(frame, max_rows=max_rows, **kwargs))


def describe_column(name: str, descriptions: Mapping[str, str]) -> str | None:
    """The description of `name`: an exact key, else the first matching glob key (`label_*`)."""
    if name in descriptions:
        return descriptions[name]
    return next((text for pattern, text in descriptions.items() if fnmatchcase(name, pattern)), None)


def column_schema(relation: duckdb.DuckDBPyRelation, descriptions: Mapping[str, str]) -> dg.TableSchema:
    """The catalog schema of a DuckDB relation: each column's DuckDB type and its description.

    `descriptions` maps column names (or glob patterns such as `label_*`) to one sentence; a column
    without one keeps an empty description (tests check that every table is fully described).
    """
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=name, type=str(dtype), description=describe_column(name, descriptions))
            for name, dtype in zip(relation.columns, relation.types)
        ]
    )


def _preview_type(dtype: object) -> str:
    kind = getattr(dtype, "kind", "O")
    return {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(kind, "string")


def table_preview(frame: pd.DataFrame) -> dg.MetadataValue:
    """A few rows as a `MetadataValue.table` (the UI draws it as a table with typed columns).

    The schema is always given: Dagster refuses an empty table without one (a run with no new rows).
    """
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name=str(c), type=_preview_type(t)) for c, t in frame.dtypes.items()]
    )
    records = [dg.TableRecord({str(k): _cell(v) for k, v in row.items()}) for row in frame.to_dict(orient="records")]
    return dg.MetadataValue.table(records, schema=schema)


def warehouse_table_metadata(
    con: duckdb.DuckDBPyConnection,
    table: str,
    descriptions: Mapping[str, str],
    preview_rows: int = 0,
    preview_sql: str | None = None,
) -> dict[str, object]:
    """Catalog metadata of a committed warehouse table: `dagster/column_schema`, `dagster/row_count`,
    `dagster/table_name` and, with `preview_rows`, a `preview` table (`preview_sql` picks the rows,
    default: the first ones)."""
    relation = con.sql(f'SELECT * FROM "{table}"')
    schema = column_schema(relation, descriptions)
    rows = con.execute(f'SELECT count(*) FROM "{table}"').fetchall()[0][0]
    metadata: dict[str, object] = {
        "dagster/column_schema": schema,
        "dagster/row_count": int(rows),
        "dagster/table_name": f"warehouse.{table}",
    }
    if preview_rows:
        frame = con.execute(preview_sql or f'SELECT * FROM "{table}" LIMIT {int(preview_rows)}').df()
        metadata["preview"] = table_preview(frame.head(preview_rows))
    return metadata
