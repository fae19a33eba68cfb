#!/usr/bin/env python3
"""Landing files of the line-item scenario (benches/lineitem.py), TPC-H shaped, at any scale.

Scale 1 is TPC-H SF 1: 150 k customers, 1.5 M orders, about 6 M line items (16 columns) over
80 months (1992-01 to 1998-08). Orders and line items arrive as one CSV per order month;
customers as a CSV, an NDJSON and a JSON-array file. 0.5% of order and line rows are delivered
again in a later `_redelivered` file with changed values (the later delivery wins). `batch/` holds
a CDC delivery: 1% of the line items of the last three months updated and 1% new line items (new
orders of the last month); `forget_ids.txt` 100 customer keys.
Needs numpy and pyarrow (the bench venv); deterministic for a given scale.
"""
import argparse
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

MONTHS = 80
START = np.datetime64("1992-01-01")


def month_of(days):
    """Month index 0..79 of dates given as days since 1992-01-01."""
    d = (START + days.astype("timedelta64[D]")).astype("datetime64[M]")
    return (d - START.astype("datetime64[M]")).astype(np.int64)


def month_name(i):
    return str(START.astype("datetime64[M]") + np.timedelta64(int(i), "M"))


def pool(rng, n, words, k):
    """n strings of k words each, drawn from `words`."""
    picks = rng.integers(0, len(words), size=(n, k))
    return np.array([" ".join(words[j] for j in row) for row in picks])


WORDS = ("furiously quickly carefully blithely slyly regular final express special pending "
         "ironic even bold silent deposits requests accounts packages instructions foxes "
         "theodolites pinto beans asymptotes dependencies ideas platelets excuses").split()


def write_csv(table, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pacsv.write_csv(table, path, pacsv.WriteOptions(include_header=True, quoting_style="needed"))


def dec(cents):
    """Money as float64 with two decimals (written as e.g. 1234.56)."""
    return pa.array(np.round(cents / 100.0, 2))


def orders_table(rng, keys, n_cust, month_lo, month_hi):
    n = len(keys)
    lo = (START.astype("datetime64[M]") + np.timedelta64(month_lo, "M")).astype("datetime64[D]")
    hi = (START.astype("datetime64[M]") + np.timedelta64(month_hi, "M")).astype("datetime64[D]")
    days = rng.integers((lo - START).astype(int), (hi - START).astype(int), size=n)
    comments = pool(rng, 5000, WORDS, 4)
    t = pa.table({
        "o_orderkey": pa.array(keys),
        "o_custkey": pa.array(rng.integers(1, n_cust + 1, size=n)),
        "o_orderstatus": pa.array(np.array(["O", "F", "P"])[rng.integers(0, 3, size=n)]),
        "o_totalprice": dec(rng.integers(90_000, 50_000_000, size=n)),
        "o_orderdate": pa.array((START + days.astype("timedelta64[D]")).astype("datetime64[D]")),
        "o_orderpriority": pa.array(np.array(["1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECIFIED", "5-LOW"])[rng.integers(0, 5, size=n)]),
        "o_clerk": pa.array(np.char.add("Clerk#", np.char.zfill(rng.integers(1, 1000, size=n).astype(str), 9))),
        "o_shippriority": pa.array(np.zeros(n, dtype=np.int64)),
        "o_comment": pa.array(comments[rng.integers(0, len(comments), size=n)]),
    })
    return t, days


def lineitem_table(rng, order_keys, order_days, scale):
    per = rng.integers(1, 8, size=len(order_keys))
    n = int(per.sum())
    okey = np.repeat(order_keys, per)
    oday = np.repeat(order_days, per)
    first = np.repeat(np.cumsum(per) - per, per)
    line = (np.arange(n) - first + 1).astype(np.int32)
    qty = rng.integers(1, 51, size=n)
    price = qty * rng.integers(90_000, 210_000, size=n) // 100
    ship = oday + rng.integers(1, 122, size=n)
    commit = oday + rng.integers(30, 91, size=n)
    receipt = ship + rng.integers(1, 31, size=n)
    comments = pool(rng, 20000, WORDS, 3)
    as_date = lambda d: pa.array((START + d.astype("timedelta64[D]")).astype("datetime64[D]"))
    t = pa.table({
        "l_orderkey": pa.array(okey),
        "l_partkey": pa.array(rng.integers(1, int(200_000 * scale) + 1, size=n)),
        "l_suppkey": pa.array(rng.integers(1, int(10_000 * scale) + 1, size=n)),
        "l_linenumber": pa.array(line),
        "l_quantity": pa.array(qty.astype(np.float64)),
        "l_extendedprice": dec(price),
        "l_discount": pa.array(rng.integers(0, 11, size=n) / 100.0),
        "l_tax": pa.array(rng.integers(0, 9, size=n) / 100.0),
        "l_returnflag": pa.array(np.array(["R", "A", "N"])[rng.integers(0, 3, size=n)]),
        "l_linestatus": pa.array(np.array(["O", "F"])[rng.integers(0, 2, size=n)]),
        "l_shipdate": as_date(ship),
        "l_commitdate": as_date(commit),
        "l_receiptdate": as_date(receipt),
        "l_shipinstruct": pa.array(np.array(["DELIVER IN PERSON", "COLLECT COD", "NONE", "TAKE BACK RETURN"])[rng.integers(0, 4, size=n)]),
        "l_shipmode": pa.array(np.array(["REG AIR", "AIR", "RAIL", "SHIP", "TRUCK", "MAIL", "FOB"])[rng.integers(0, 7, size=n)]),
        "l_comment": pa.array(comments[rng.integers(0, len(comments), size=n)]),
    })
    return t, month_of(oday)


def redeliver(rng, table, share):
    """A sample of rows with changed values (a later delivery of the same keys)."""
    idx = np.sort(rng.choice(table.num_rows, size=max(1, int(table.num_rows * share)), replace=False))
    t = table.take(pa.array(idx))
    col = "l_comment" if "l_comment" in t.column_names else "o_comment"
    return t.set_column(t.column_names.index(col), col, pa.array(["re-delivered"] * t.num_rows))


def write_by_month(table, months, out, name, rng, share):
    order = np.argsort(months, kind="stable")
    table, months = table.take(pa.array(order)), months[order]
    bounds = np.searchsorted(months, np.arange(MONTHS + 1))
    total = 0
    for m in range(MONTHS):
        part = table.slice(bounds[m], bounds[m + 1] - bounds[m])
        write_csv(part, os.path.join(out, name, f"{name}_{month_name(m)}.csv"))
        if m > 0 and share > 0:
            # The previous month's rows delivered again (corrections), in a later file.
            prev = table.slice(bounds[m - 1], bounds[m] - bounds[m - 1])
            write_csv(redeliver(rng, prev, share), os.path.join(out, name, f"{name}_{month_name(m - 1)}_redelivered.csv"))
        total += part.num_rows
    return total


def customers(rng, n, out):
    names = np.char.add("Customer#", np.char.zfill(np.arange(1, n + 1).astype(str), 9))
    addrs = pool(rng, 5000, WORDS, 2)
    t = pa.table({
        "c_custkey": pa.array(np.arange(1, n + 1)),
        "c_name": pa.array(names),
        "c_address": pa.array(addrs[rng.integers(0, len(addrs), size=n)]),
        "c_nationkey": pa.array(rng.integers(0, 25, size=n)),
        "c_phone": pa.array(np.char.add(np.char.add(rng.integers(10, 35, size=n).astype(str), "-"), rng.integers(100_0000, 999_9999, size=n).astype(str))),
        "c_acctbal": dec(rng.integers(-99_999, 999_999, size=n)),
        "c_mktsegment": pa.array(np.array(["AUTOMOBILE", "BUILDING", "FURNITURE", "MACHINERY", "HOUSEHOLD"])[rng.integers(0, 5, size=n)]),
    })
    third = n // 3
    write_csv(t.slice(0, third), os.path.join(out, "customers", "customers.csv"))
    rows = t.slice(third).to_pylist()
    os.makedirs(os.path.join(out, "customers_json"), exist_ok=True)
    with open(os.path.join(out, "customers_json", "customers_1.ndjson"), "w") as f:
        for r in rows[: len(rows) // 2]:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "customers_json", "customers_2.json"), "w") as f:
        json.dump(rows[len(rows) // 2:], f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = np.random.default_rng(20261206)
    n_cust, n_orders = int(150_000 * a.scale), int(1_500_000 * a.scale)
    landing, batch = os.path.join(a.out, "landing"), os.path.join(a.out, "batch")
    customers(rng, n_cust, landing)
    okeys = np.arange(1, n_orders + 1, dtype=np.int64)
    orders, odays = orders_table(rng, okeys, n_cust, 0, MONTHS)
    write_by_month(orders, month_of(odays), landing, "orders", rng, 0.005)
    lines, lmonths = lineitem_table(rng, okeys, odays, a.scale)
    n_lines = write_by_month(lines, lmonths, landing, "lineitem", rng, 0.005)
    # The CDC batch: 1% updates of the last three months' line items, 1% new line items.
    recent = np.nonzero(lmonths >= MONTHS - 3)[0]
    upd = lines.take(pa.array(np.sort(rng.choice(recent, size=n_lines // 100, replace=False))))
    upd = upd.set_column(upd.column_names.index("l_comment"), "l_comment", pa.array(["cdc update"] * upd.num_rows))
    new_orders = n_lines // 100 // 4
    nkeys = np.arange(n_orders + 1, n_orders + 1 + new_orders, dtype=np.int64)
    norders, ndays = orders_table(rng, nkeys, n_cust, MONTHS - 1, MONTHS)
    nlines, _ = lineitem_table(rng, nkeys, ndays, a.scale)
    write_csv(norders, os.path.join(batch, "orders", "orders_cdc.csv"))
    write_csv(pa.concat_tables([upd, nlines]), os.path.join(batch, "lineitem", "lineitem_cdc.csv"))
    ids = rng.choice(np.arange(1, n_cust + 1), size=100, replace=False)
    with open(os.path.join(a.out, "forget_ids.txt"), "w") as f:
        f.write("\n".join(str(i) for i in sorted(ids)) + "\n")
    print(f"scale {a.scale:g}: {n_cust} customers, {n_orders} orders, {n_lines} line items; "
          f"batch {upd.num_rows} updates + {nlines.num_rows} new line items")


if __name__ == "__main__":
    main()
