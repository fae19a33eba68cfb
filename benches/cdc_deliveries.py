#!/usr/bin/env python3
"""Several CDC deliveries into the line-item lake, one `silt run` each (`make bench` does not run
it; it compares silt binaries, e.g. before and after a change to the MERGE).

The lake is built once at scale S (benches/lineitem_data.py data, benches/lineitem/ project:
ingest, silver, gold) with the first binary and kept. Then, for each binary in turn (alternating,
`--repeat` rounds), the lake is restored and K deliveries land one after the other: the
scenario's CDC batch (1% updates of the last three months' line items, 1% new ones), then K-1
re-deliveries of the same line items with a new comment each (all updates, the same touched
months). Each line gives a delivery's `silt run` wall seconds and peak RSS (wait4), and what the
stg_lineitem MERGE read and rewrote.

  python benches/cdc_deliveries.py --scale 2 --deliveries 4 --silt OLD --silt NEW
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lineitem import HERE, measure  # noqa: E402


def run(binary, project, env, args, out_dir):
    out, err = os.path.join(out_dir, "out.json"), os.path.join(out_dir, "err.log")
    wall, code, rss = measure([binary, "--project", project, "--json"] + args, out, err, env)
    if code not in (0, 1):
        sys.exit(f"silt {' '.join(args)} failed ({code}):\n" + open(err).read()[-4000:])
    text = open(out).read()
    return wall, rss, (json.loads(text) if text.strip() else None)


def redelivery(src, dst, k):
    """The batch's line items again, every comment changed: all of them updates."""
    names = [n.strip('"') for n in open(src).readline().strip().split(",")]
    t = pc.read_csv(src, convert_options=pc.ConvertOptions(column_types={n: pa.string() for n in names}))
    t = t.set_column(names.index("l_comment"), "l_comment", pa.array([f"delivery {k}"] * t.num_rows))
    pc.write_csv(t, dst)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--silt", action="append", required=True, help="a silt binary (give two to compare)")
    ap.add_argument("--deliveries", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or f"/tmp/silt-deliveries-s{a.scale:g}"
    generated = os.path.join(work, "generated")
    if not os.path.exists(os.path.join(generated, "forget_ids.txt")):
        shutil.rmtree(generated, ignore_errors=True)
        subprocess.run([a.python, os.path.join(HERE, "lineitem_data.py"), "--scale", str(a.scale), "--out", generated], check=True)
    project = os.path.join(work, "silt-project")
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(os.path.join(HERE, "lineitem"), project)
    batch = os.path.join(generated, "batch")
    deliveries = os.path.join(work, "deliveries")
    if not os.path.exists(os.path.join(deliveries, str(a.deliveries))):
        shutil.rmtree(deliveries, ignore_errors=True)
        for k in range(1, a.deliveries + 1):
            d = os.path.join(deliveries, str(k))
            if k == 1:
                shutil.copytree(batch, d)
            else:
                os.makedirs(os.path.join(d, "lineitem"))
                redelivery(os.path.join(batch, "lineitem", "lineitem_cdc.csv"),
                           os.path.join(d, "lineitem", f"lineitem_cdc_{k}.csv"), k)
    base, lake, landing = (os.path.join(work, x) for x in ("base-lake", "silt-lake", "landing"))
    env = dict(os.environ, SILT_LAKE=lake, SILT_LANDING=landing, SILT_LOG="error")

    def fresh_landing():
        shutil.rmtree(landing, ignore_errors=True)
        shutil.copytree(os.path.join(generated, "landing"), landing, copy_function=os.link)

    if not os.path.exists(base):
        fresh_landing()
        shutil.rmtree(lake, ignore_errors=True)
        for args in (["ingest"], ["build"]):
            wall, rss, _ = run(a.silt[0], project, env, args, project)
            print(f"setup {args[0]}: {wall:.2f} s, {rss:.0f} MB", flush=True)
        shutil.copytree(lake, base)
    rows = {}
    for r in range(a.repeat):
        for i, binary in enumerate(a.silt):
            fresh_landing()
            shutil.rmtree(lake, ignore_errors=True)
            shutil.copytree(base, lake)
            os.sync()
            for k in range(1, a.deliveries + 1):
                shutil.copytree(os.path.join(deliveries, str(k)), landing, dirs_exist_ok=True, copy_function=os.link)
                wall, rss, out = run(binary, project, env, ["run"], project)
                m = next(x for x in out["models"] if x["model"] == "stg_lineitem")
                row = {"round": r, "silt": i, "delivery": k, "s": round(wall, 2), "rss_mb": round(rss),
                       "files_scanned": m["files_scanned"], "files_removed": m["files_removed"],
                       "rows_updated": m["rows_updated"], "rows_inserted": m["rows_inserted"]}
                print(json.dumps(row), flush=True)
                rows.setdefault((i, k), []).append((wall, rss))
    if not rows:
        return
    print(f"\nCDC deliveries, scale {a.scale:g}: each delivery's run, fastest / highest RSS of {a.repeat}")
    print(f"{'delivery':>8} " + " ".join(f"{'silt ' + str(i) + ' s':>10} {'MB':>6}" for i in range(len(a.silt))))
    for k in range(1, a.deliveries + 1):
        cells = []
        for i in range(len(a.silt)):
            v = rows[(i, k)]
            cells.append(f"{min(w for w, _ in v):10.2f} {max(m for _, m in v):6.0f}")
        print(f"{k:8d} " + " ".join(cells))
    for i, b in enumerate(a.silt):
        print(f"silt {i}: {b}")


if __name__ == "__main__":
    main()
