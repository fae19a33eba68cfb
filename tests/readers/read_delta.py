"""Read a Delta table as another engine would, for tests/it/environments.rs.

usage: read_delta.py deltalake|duckdb TABLE_DIR
Prints "<rows> <sum of fee_amount as text>"; exits non-zero with the engine's error on stderr.
DuckDB loads its delta extension from $HOME/.duckdb (tests/emulators/setup.sh puts it there
from PyPI), so nothing is downloaded.
"""
import sys

engine, table = sys.argv[1], sys.argv[2]
sql = "select count(*) as n, cast(sum(fee_amount) as varchar) as s from t"
if engine == "deltalake":
    import deltalake
    import duckdb

    dt = deltalake.DeltaTable(table)
    # delta-rs's own DataFusion scan (QueryBuilder) resolves absolute file URLs.
    result = deltalake.QueryBuilder().register("t", dt).execute(sql).read_all()
    n, s = duckdb.sql("select * from result").fetchone()
elif engine == "duckdb":
    import duckdb

    con = duckdb.connect()
    con.execute("LOAD delta")
    n, s = con.execute(sql.replace(" from t", f" from delta_scan('{table}')")).fetchone()
else:
    sys.exit(f"unknown engine {engine}")
print(n, s)
