//! Data nobody here designed, in miniature, as projects the tests build on: an airline on-time
//! table (monthly CSV files) and a TPC-H-like order schema with integer keys, in an empty
//! project of their own.

use std::path::Path;

use super::golden::sorted_csv;
use super::{Project, walk};

const SILT_TOML: &str = r#"[project]
name = "outside"

[lake]
root = "lake"

[landing]
root = "landing"

[gdpr]
hmac_key = "outside-test-key"
"#;

/// An empty project with these files (paths relative to the project dir).
pub fn project(files: &[(&str, &str)]) -> Project {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Project { dir };
    write(p.path(), "silt.toml", SILT_TOML);
    std::fs::create_dir_all(p.landing()).unwrap();
    for (path, text) in files {
        write(p.path(), path, text);
    }
    p
}

pub fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

pub fn csv(p: &Project, sql: &str) -> String {
    sorted_csv(&p.ok(&["query", sql, "--format", "csv"]))
}

pub const FLIGHTS_TOML: &str = r#"description = "On-time performance, one CSV per month"
glob = "flights/*.csv"
format = "csv"
primary_key = ["flight_id"]
partition_by = "flight_date:month"
on_changed_file = "ingest"

[[columns]]
name = "flight_id"
type = "int64"
nullable = false

[[columns]]
name = "flight_date"
type = "date"
nullable = false

[[columns]]
name = "carrier"
type = "string"

[[columns]]
name = "origin"
type = "string"

[[columns]]
name = "dep_delay"
type = "int64"
"#;

/// stg_flights: incremental, partitioned by month, no dedupe (a changed file's rows replace the
/// old ones by key through the MERGE). fct_origin_month recomputes whole months.
pub const STG_FLIGHTS: &str = "{{ config(materialized='incremental', unique_key='flight_id', partition_by='flight_month') }}
select flight_id, flight_date, carrier, origin, dep_delay, to_char(flight_date, '%Y-%m') as flight_month
from {{ source('flights') }}
";

const FCT_ORIGIN_MONTH: &str = "{{ config(materialized='incremental', unique_key=['origin', 'flight_month'], recompute_by='flight_month') }}
select origin, flight_month, count(*) as flights, sum(dep_delay) as total_delay
from {{ ref('stg_flights') }}
group by origin, flight_month
";

/// A month of flights: ids from `first`, three origins, delays from the id.
pub fn month(first: i64, ym: &str, n: i64, bump: i64) -> String {
    let mut s = String::from("flight_id,flight_date,carrier,origin,dep_delay\n");
    for i in 0..n {
        let id = first + i;
        let day = 1 + i % 28;
        let origin = ["JFK", "SFO", "ORD"][(id % 3) as usize];
        s.push_str(&format!(
            "{id},{ym}-{day:02},AA,{origin},{}\n",
            (id * 7) % 60 - 10 + bump
        ));
    }
    s
}

pub fn flights() -> Project {
    let p = project(&[
        ("sql/bronze/flights.toml", FLIGHTS_TOML),
        ("sql/silver/stg_flights.sql", STG_FLIGHTS),
        ("sql/gold/fct_origin_month.sql", FCT_ORIGIN_MONTH),
    ]);
    write(
        &p.landing(),
        "flights/2024_01.csv",
        &month(1, "2024-01", 40, 0),
    );
    write(
        &p.landing(),
        "flights/2024_02.csv",
        &month(101, "2024-02", 40, 0),
    );
    p
}

pub const CUSTOMERS_TOML: &str = r#"glob = "customers/*.csv"
format = "csv"
primary_key = ["c_custkey"]
subject_key = "c_custkey"
pii = ["c_name", "c_phone"]

[[columns]]
name = "c_custkey"
type = "int64"
nullable = false

[[columns]]
name = "c_name"
type = "string"

[[columns]]
name = "c_phone"
type = "string"

[[columns]]
name = "c_acctbal"
type = "decimal(12,2)"
"#;

pub const ORDERS_TOML: &str = r#"glob = "orders/*.ndjson"
format = "ndjson"
primary_key = ["o_orderkey"]
subject_key = "o_custkey"

[[columns]]
name = "o_orderkey"
type = "int64"
nullable = false

[[columns]]
name = "o_custkey"
type = "int64"
nullable = false

[[columns]]
name = "o_totalprice"
type = "decimal(12,2)"
"#;

const LINEITEM_TOML: &str = r#"glob = "lineitem/*.csv"
format = "csv"
primary_key = ["l_orderkey", "l_linenumber"]
subject_via = { column = "l_orderkey", table = "orders", key = "o_orderkey" }

[[columns]]
name = "l_orderkey"
type = "int64"
nullable = false

[[columns]]
name = "l_linenumber"
type = "int32"
nullable = false

[[columns]]
name = "l_quantity"
type = "int64"
"#;

/// Products: no subject in it, but quantities that equal customer keys.
const PRODUCTS_TOML: &str = r#"glob = "products/*.csv"
format = "csv"
primary_key = ["p_partkey"]

[[columns]]
name = "p_partkey"
type = "int64"
nullable = false

[[columns]]
name = "p_name"
type = "string"

[[columns]]
name = "qty"
type = "int64"
"#;

pub fn orders_project() -> Project {
    let p = project(&[
        ("sql/bronze/customers.toml", CUSTOMERS_TOML),
        ("sql/bronze/orders.toml", ORDERS_TOML),
        ("sql/bronze/lineitem.toml", LINEITEM_TOML),
        ("sql/bronze/products.toml", PRODUCTS_TOML),
        (
            "sql/silver/stg_lineitem.sql",
            "{{ config(materialized='incremental', unique_key=['l_orderkey', 'l_linenumber']) }}\n\
             select l_orderkey, l_linenumber, l_quantity from {{ source('lineitem') }}\n",
        ),
        (
            "sql/silver/products.sql",
            "{{ config(materialized='incremental', unique_key='p_partkey') }}\n\
             select p_partkey, p_name, qty from {{ source('products') }}\n",
        ),
        (
            // Keeps the order key but not the customer's: reached through lineitem's path.
            "sql/silver/order_amounts.sql",
            "{{ config(materialized='incremental', unique_key='o_orderkey') }}\n\
             select o_orderkey, o_totalprice from {{ source('orders') }}\n",
        ),
        (
            "sql/gold/order_volume.sql",
            "{{ config(materialized='table') }}\n\
             select o.o_custkey, count(*) as lines, sum(l.l_quantity) as quantity \
             from {{ source('orders') }} o join {{ ref('stg_lineitem') }} l on l.l_orderkey = o.o_orderkey \
             group by o.o_custkey\n",
        ),
    ]);
    write(
        &p.landing(),
        "customers/customers.csv",
        "c_custkey,c_name,c_phone,c_acctbal\n\
         41,Customer#000000041,27-644-224-5210,270.95\n\
         42,Customer#000000042,14-128-190-5944,8727.68\n\
         420,Customer#000000420,11-987-654-3210,100.00\n",
    );
    write(
        &p.landing(),
        "orders/orders_1.ndjson",
        "{\"o_orderkey\": 1, \"o_custkey\": 41, \"o_totalprice\": \"10.00\"}\n\
         {\"o_orderkey\": 2, \"o_custkey\": 42, \"o_totalprice\": \"20.00\"}\n\
         {\"o_orderkey\": 3, \"o_custkey\": 42, \"o_totalprice\": \"30.00\"}\n\
         {\"o_orderkey\": 4, \"o_custkey\": 420, \"o_totalprice\": \"42.00\"}\n",
    );
    // Order 1 (customer 41) has a line whose quantity is 42; orders 2 and 3 are customer 42's.
    write(
        &p.landing(),
        "lineitem/lineitem_1.csv",
        "l_orderkey,l_linenumber,l_quantity\n1,1,42\n1,2,5\n2,1,7\n2,2,42\n3,1,1\n4,1,42\n",
    );
    write(
        &p.landing(),
        "products/products.csv",
        "p_partkey,p_name,qty\n1,bolt,42\n2,nut,41\n42,washer,3\n",
    );
    p
}

/// People in partitions whose values need encoding in object names (`slot`, e.g.
/// `T 1:00/a%2B`): a source with a subject key and PII, an incremental silver model
/// partitioned by it, and a gold model recomputed by it. No landing files.
pub fn slots_project() -> Project {
    project(&[
        (
            "sql/bronze/people.toml",
            "glob = \"people/*.csv\"\nformat = \"csv\"\nprimary_key = [\"pid\"]\nsubject_key = \"pid\"\npii = [\"email\"]\n\n\
             [[columns]]\nname = \"pid\"\ntype = \"int64\"\nnullable = false\n\n\
             [[columns]]\nname = \"email\"\ntype = \"string\"\n\n\
             [[columns]]\nname = \"slot\"\ntype = \"string\"\n",
        ),
        (
            "sql/silver/stg_people.sql",
            "{{ config(materialized='incremental', unique_key='pid', partition_by='slot', pii=['email']) }}\n\
             select pid, email, slot from {{ source('people') }}\n",
        ),
        (
            "sql/gold/by_slot.sql",
            "{{ config(materialized='incremental', unique_key='slot', recompute_by='slot') }}\n\
             select slot, count(*) as people from {{ ref('stg_people') }} group by slot\n",
        ),
    ])
}

pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, &mut |f| out.push(f.display().to_string()));
    out.sort();
    out
}
