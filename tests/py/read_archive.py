"""Reads a Parquet archive with pyarrow and DuckDB, and prints what each sees as JSON.

The archive tests compare this with what the archiver wrote, so a file that only our own
reader understands fails CI.
"""
import json
import sys

import duckdb
import pyarrow.parquet as pq

path = sys.argv[1]
table = pq.read_table(path)
meta = pq.read_metadata(path).metadata
first = table.slice(0, 1).to_pylist()[0]
con = duckdb.connect()
src = f"read_parquet('{path}')"
described = con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()
rows, min_ms, max_ms, seq_sum = con.execute(
    f"SELECT count(*), epoch_ms(min(measured_at)), epoch_ms(max(measured_at)), sum(seq) FROM {src}"
).fetchone()
battery = con.execute(
    f"SELECT json_extract(extras, '$.battery')::BIGINT FROM {src} WHERE extras IS NOT NULL LIMIT 1"
).fetchone()
print(json.dumps({
    "pyarrow": {
        "types": {f.name: str(f.type) for f in table.schema},
        "rows": table.num_rows,
        "first_measured_at_us": int(first["measured_at"].timestamp() * 1_000_000),
        "first_device_id": first["device_id"],
        "footer": {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"telemetry.")},
    },
    "duckdb": {
        "types": {r[0]: r[1] for r in described},
        "rows": rows,
        "min_ms": min_ms,
        "max_ms": max_ms,
        "seq_sum": int(seq_sum) if seq_sum is not None else None,
        "battery": battery[0] if battery else None,
    },
}))
