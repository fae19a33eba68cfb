#!/usr/bin/env python3
"""Deterministic generator for the reference domain (platform fees of a financial-adviser firm)
at scale S: S=1 is 1,000,000 fees, 100,000 clients and 36 months, as monthly CSV files (fees),
quarterly JSON arrays (client profiles with PII) and one NDJSON file (advisers), in the layout of
the reference sources (sql/bronze/*.toml). Also writes the incremental batch: 1% late
corrections of existing fees and 1% new fees, all in the last 2 months.

usage: generate.py --scale S --out DIR      (DIR/landing, DIR/batch, DIR/forget_ids.txt)
Same scale, same bytes: the seed is fixed.
"""
import argparse
import datetime as dt
import json
import os
import random

FIRST = ["Amelia", "Oliver", "Isla", "George", "Ava", "Noah", "Mia", "Arthur", "Freya", "Leo"]
LAST = ["Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Davies", "Evans", "Thomas", "Roberts"]
CITIES = ["London", "Leeds", "Bristol", "Manchester", "York"]
TEAMS = ["Pensions", "Wealth", "Protection"]
NOTES = ["quarterly platform fee", "ongoing advice", "initial advice, onboarding", "fund switch"]
START = dt.date(2024, 1, 1)
MONTHS = 36


def month_start(i):
    y, m = divmod(START.month - 1 + i, 12)
    return dt.date(START.year + y, m + 1, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rnd = random.Random(20261123)
    n_fees = int(1_000_000 * a.scale)
    n_clients = max(100, int(100_000 * a.scale))
    n_adv = max(8, int(200 * a.scale))
    land = os.path.join(a.out, "landing")
    batch = os.path.join(a.out, "batch")
    for d in ("fees", "clients", "advisers"):
        os.makedirs(os.path.join(land, d), exist_ok=True)
    os.makedirs(os.path.join(batch, "fees"), exist_ok=True)

    with open(os.path.join(land, "advisers", "advisers.ndjson"), "w") as f:
        for i in range(1, n_adv + 1):
            f.write(json.dumps({
                "adviser_id": f"A{i:05d}", "name": f"{rnd.choice(FIRST)} {rnd.choice(LAST)}",
                "team": rnd.choice(TEAMS), "region": rnd.choice(CITIES),
                "joined_date": str(dt.date(2010, 1, 1) + dt.timedelta(days=rnd.randrange(4000))),
            }) + "\n")

    signup = {}
    quarters = {}
    for i in range(1, n_clients + 1):
        cid = f"C{i:07d}"
        day = START + dt.timedelta(days=rnd.randrange(MONTHS * 30))
        signup[cid] = day
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        quarters.setdefault((day.year, (day.month - 1) // 3 + 1), []).append({
            "client_id": cid,
            "full_name": f"{first} {last} {i}",
            "email": f"{first.lower()}.{last.lower()}{i}@example.com",
            "nino": "%s%s%06d%s" % (chr(65 + i % 26), chr(65 + (i // 26) % 26), i % 1000000, "ABCD"[i % 4]),
            "date_of_birth": str(dt.date(1950, 1, 1) + dt.timedelta(days=rnd.randrange(18000))),
            "address": {"line1": f"{rnd.randrange(1, 300)} High Street", "city": rnd.choice(CITIES),
                        "postcode": f"LS{rnd.randrange(1, 30)} {rnd.randrange(1, 9)}AB"},
            "signup_date": str(day),
            "accounts": rnd.sample(["SIPP", "ISA", "GIA"], rnd.randrange(1, 4)),
        })
    for (y, q), rows in sorted(quarters.items()):
        with open(os.path.join(land, "clients", f"clients_{y}_q{q}.json"), "w") as f:
            json.dump(rows, f, indent=1)

    cids = sorted(signup)
    per_month = n_fees // MONTHS
    fee_no = 0
    last2 = []
    for mi in range(MONTHS):
        ms = month_start(mi)
        days = (month_start(mi + 1) - ms).days
        with open(os.path.join(land, "fees", f"fees_{ms:%Y_%m}.csv"), "w", newline="") as f:
            f.write("fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\n")
            for _ in range(per_month):
                fee_no += 1
                cid = cids[rnd.randrange(len(cids))]
                amt = round(rnd.uniform(5, 900), 2) * (-1 if rnd.random() < 0.03 else 1)
                row = (f"F{fee_no:09d}", cid, f"A{rnd.randrange(1, n_adv + 1):05d}",
                       str(ms + dt.timedelta(days=rnd.randrange(days))), f"{amt:.2f}")
                note = rnd.choice(NOTES)
                f.write("%s,%s,%s,%s,%s,GBP,\"%s\"\n" % (row + (note,)))
                if mi >= MONTHS - 2:
                    last2.append(row)
    # The incremental batch: 1% corrections of existing fees, 1% new fees, last 2 months.
    n_b = max(1, n_fees // 100)
    with open(os.path.join(batch, "fees", "fees_batch.csv"), "w") as f:
        f.write("fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\n")
        for row in rnd.sample(last2, min(n_b, len(last2))):
            fid, cid, adv, day, amt = row
            f.write(f"{fid},{cid},{adv},{day},{float(amt) + 10:.2f},GBP,late correction\n")
        for _ in range(n_b):
            fee_no += 1
            ms = month_start(MONTHS - 1 - rnd.randrange(2))
            f.write("F%09d,%s,A%05d,%s,%.2f,GBP,new\n" % (
                fee_no, cids[rnd.randrange(len(cids))], rnd.randrange(1, n_adv + 1),
                ms + dt.timedelta(days=rnd.randrange(28)), rnd.uniform(5, 900)))
    with open(os.path.join(a.out, "forget_ids.txt"), "w") as f:
        for cid in rnd.sample(cids, 100):
            f.write(cid + "\n")


if __name__ == "__main__":
    main()
