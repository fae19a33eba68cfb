//! Column lineage (issue 32): the reference pipeline's gold columns against a golden file and
//! hand-derived expectations; every SQL construct on a TPC-H-like project nobody here designed;
//! the PII flow check failing a leaking build with its path; `--changed`, `--run`; a fresh
//! `silt init` project; and the `silt docs` site opened in a real Chromium.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::datasets::{orders_project, project, write};
use crate::support::{Project, SILT, repo};

/// Every column of `table` → its direct upstream columns as `table.column:kind`, from
/// `silt --json lineage <table>`.
fn direct(p: &Project, table: &str) -> BTreeMap<String, BTreeSet<String>> {
    let out = p.ok(&["--json", "lineage", table]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let trees = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    trees
        .iter()
        .map(|t| {
            let col = t["column"].as_str().unwrap();
            let name = col.rsplit('.').next().unwrap().to_string();
            let deps = t["children"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    format!(
                        "{}:{}",
                        c["column"].as_str().unwrap(),
                        c["kind"].as_str().unwrap()
                    )
                })
                .collect();
            (name, deps)
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn reference_gold_lineage_matches_hand_derived_and_golden() {
    let p = Project::empty_reference();
    // fct_monthly_revenue: two group-bys over stg_fees. Counts read no column: only the
    // grouping keys decide them.
    let keys = [
        "silver.stg_fees.fee_month",
        "silver.stg_fees.adviser_id",
        "silver.stg_fees.currency",
        "silver.stg_fees.client_id",
    ];
    let filters = |except: &str| -> Vec<String> {
        keys.iter()
            .filter(|k| **k != except)
            .map(|k| format!("{k}:filter"))
            .collect()
    };
    let with = |data: &[&str], except: &str| -> BTreeSet<String> {
        let mut s = set(data);
        s.extend(filters(except));
        s
    };
    let fct = direct(&p, "gold.fct_monthly_revenue");
    let expected: BTreeMap<String, BTreeSet<String>> = [
        (
            "fee_month",
            with(
                &["silver.stg_fees.fee_month:copied"],
                "silver.stg_fees.fee_month",
            ),
        ),
        (
            "adviser_id",
            with(
                &["silver.stg_fees.adviser_id:copied"],
                "silver.stg_fees.adviser_id",
            ),
        ),
        (
            "currency",
            with(
                &["silver.stg_fees.currency:copied"],
                "silver.stg_fees.currency",
            ),
        ),
        ("fees", with(&[], "")),
        ("clients", with(&[], "")),
        (
            "revenue",
            with(&["silver.stg_fees.fee_amount:aggregated"], ""),
        ),
        (
            "refunds",
            with(&["silver.stg_fees.fee_amount:aggregated"], ""),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(fct, expected);

    // rpt_client_ltv (its full build): dim_clients joined to per-client sums of stg_fees.
    let ltv = direct(&p, "gold.rpt_client_ltv");
    let join = ["gold.dim_clients.client_id", "silver.stg_fees.client_id"];
    let cols = |data: &[&str]| -> BTreeSet<String> {
        let mut s = set(data);
        for k in join {
            if !data.iter().any(|d| d.starts_with(&format!("{k}:"))) {
                s.insert(format!("{k}:filter"));
            }
        }
        s
    };
    let horizon = cols(&[
        "silver.stg_fees.fee_date:aggregated",
        "silver.stg_fees.fee_amount:aggregated",
        "gold.dim_clients.first_fee_date:aggregated",
    ]);
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("client_id", cols(&["gold.dim_clients.client_id:copied"])),
        (
            "cohort_month",
            cols(&["gold.dim_clients.cohort_month:copied"]),
        ),
        (
            "first_touch_adviser_id",
            cols(&["gold.dim_clients.first_touch_adviser_id:copied"]),
        ),
        (
            "first_fee_date",
            cols(&["gold.dim_clients.first_fee_date:copied"]),
        ),
        ("fees", cols(&["silver.stg_fees.fee_id:aggregated"])),
        ("ltv_1m", horizon.clone()),
        ("ltv_3m", horizon.clone()),
        ("ltv_6m", horizon.clone()),
        ("ltv_12m", horizon),
        (
            "ltv_total",
            cols(&["silver.stg_fees.fee_amount:aggregated"]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(ltv, expected);

    // Every gold column's whole upstream tree, down to the landing fields, against the
    // checked-in golden file (SILT_BLESS=1 rewrites it after a reviewed change).
    let mut text = String::new();
    for g in crate::support::golden::GOLD {
        text.push_str(&p.ok(&["lineage", &format!("gold.{g}")]));
        text.push('\n');
    }
    let golden = repo().join("tests/golden/lineage_gold.txt");
    if std::env::var_os("SILT_BLESS").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(text, want, "gold lineage differs from {}", golden.display());
    // The tree reaches the landing fields.
    assert!(text.contains("landing fees/*.csv: fee_amount"), "{text}");
    assert!(
        text.contains("landing clients/*.json: signup_date"),
        "{text}"
    );
}

/// Customer and product ids in one column: a union, and no subject key.
const PARTIES_SQL: &str = "{{ config(materialized='table') }}\n\
     select c_custkey as party, 'customer' as party_kind from {{ source('customers') }}\n\
     union all\n\
     select p_partkey as party, 'product' as party_kind from {{ source('products') }}\n";

#[test]
fn lineage_follows_ctes_joins_case_windows_aggregates_and_unions_on_outside_data() {
    let p = orders_project();
    write(
        p.path(),
        "sql/silver/order_facts.sql",
        "{{ config(materialized='table') }}\n\
         with o as (select o_orderkey, o_custkey, o_totalprice from {{ source('orders') }}),\n\
         l as (select l_orderkey, sum(l_quantity) as qty from {{ source('lineitem') }} group by l_orderkey)\n\
         select o.o_orderkey as order_key, o.o_custkey as customer,\n\
                case when o.o_totalprice > 25 then 'big' else 'small' end as size,\n\
                l.qty,\n\
                rank() over (partition by o.o_custkey order by o.o_totalprice desc) as price_rank\n\
         from o left join l on l.l_orderkey = o.o_orderkey\n\
         where o.o_totalprice > 0\n",
    );
    write(p.path(), "sql/gold/parties.sql", PARTIES_SQL);
    write(
        p.path(),
        "sql/gold/customer_sizes.sql",
        "{{ config(materialized='table') }}\n\
         select customer, count(*) as orders, max(qty) as biggest\n\
         from {{ ref('order_facts') }} where size = 'big' group by customer\n",
    );
    let of = direct(&p, "silver.order_facts");
    let rows = [
        "bronze.orders.o_totalprice",
        "bronze.orders.o_orderkey",
        "bronze.lineitem.l_orderkey",
    ];
    let cols = |data: &[&str]| -> BTreeSet<String> {
        let mut s = set(data);
        for k in rows {
            if !data.iter().any(|d| d.starts_with(&format!("{k}:"))) {
                s.insert(format!("{k}:filter"));
            }
        }
        s
    };
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("order_key", cols(&["bronze.orders.o_orderkey:copied"])),
        ("customer", cols(&["bronze.orders.o_custkey:copied"])),
        ("size", cols(&["bronze.orders.o_totalprice:transformed"])),
        ("qty", cols(&["bronze.lineitem.l_quantity:aggregated"])),
        (
            "price_rank",
            cols(&[
                "bronze.orders.o_custkey:aggregated",
                "bronze.orders.o_totalprice:aggregated",
            ]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(of, expected);

    let parties = direct(&p, "gold.parties");
    assert_eq!(
        parties["party"],
        set(&[
            "bronze.customers.c_custkey:copied",
            "bronze.products.p_partkey:copied"
        ])
    );
    assert_eq!(
        parties["party_kind"],
        set(&[]),
        "a constant reads no column"
    );

    let sizes = direct(&p, "gold.customer_sizes");
    assert_eq!(
        sizes["biggest"],
        set(&[
            "silver.order_facts.qty:aggregated",
            "silver.order_facts.size:filter",
            "silver.order_facts.customer:filter"
        ])
    );
    assert_eq!(
        sizes["orders"],
        set(&[
            "silver.order_facts.size:filter",
            "silver.order_facts.customer:filter"
        ])
    );

    // Downstream of the order total: every column it feeds or whose rows it decides,
    // across both models.
    let out = p.ok(&[
        "--json",
        "lineage",
        "bronze.orders.o_totalprice",
        "--downstream",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut reached = BTreeSet::new();
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        for c in v["children"].as_array().unwrap() {
            out.insert(format!(
                "{}:{}",
                c["column"].as_str().unwrap(),
                c["kind"].as_str().unwrap()
            ));
            walk(c, out);
        }
    }
    walk(&v, &mut reached);
    for want in [
        "silver.order_facts.size:transformed",
        "silver.order_facts.price_rank:aggregated",
        "silver.order_facts.order_key:filter",
        "gold.customer_sizes.biggest:filter",
        "gold.customer_sizes.customer:filter",
    ] {
        assert!(reached.contains(want), "{want} not in {reached:?}");
    }
    assert!(
        !reached.iter().any(|r| r.starts_with("gold.parties")),
        "{reached:?}"
    );

    // A column that does not exist: a usage error with a suggestion.
    let out = p.exits(&["lineage", "silver.order_facts.sizes"], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did you mean 'size'"), "{err}");

    // The lineage a build computes matches the tables it writes: same columns, same names.
    p.ok(&["run"]);
    let site: Value = {
        p.ok(&["docs", "--out", "site"]);
        serde_json::from_str(&std::fs::read_to_string(p.path().join("site/data.json")).unwrap())
            .unwrap()
    };
    for t in site["tables"].as_array().unwrap() {
        let name = t["table"].as_str().unwrap();
        let (layer, table) = name.split_once('.').unwrap();
        let mine: BTreeSet<String> = t["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        let actual: BTreeSet<String> = p
            .query(&format!(
                "select column_name from information_schema.columns where table_schema = '{layer}' and table_name = '{table}'"
            ))
            .iter()
            .map(|r| r["column_name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(mine, actual, "{name}");
    }
}

const PEOPLE_TOML: &str = r#"glob = "people/*.csv"
format = "csv"
primary_key = ["pid"]
subject_key = "pid"
pii = ["email"]

[[columns]]
name = "pid"
type = "int64"
nullable = false

[[columns]]
name = "email"
type = "string"

[[columns]]
name = "country"
type = "string"
"#;

#[test]
fn a_model_leaking_email_into_gold_fails_the_build_with_the_path() {
    let p = project(&[
        ("sql/bronze/people.toml", PEOPLE_TOML),
        (
            "sql/silver/people.sql",
            "{{ config(materialized='table', pii=['email']) }}\n\
             select pid, email, country from {{ source('people') }}\n",
        ),
        (
            "sql/gold/contacts.sql",
            "{{ config(materialized='table') }}\n\
             select pid, lower(email) as contact, country from {{ ref('people') }}\n",
        ),
    ]);
    write(
        &p.landing(),
        "people/p1.csv",
        "pid,email,country\n1,Ann@Example.com,UK\n2,bob@example.org,FR\n",
    );
    let out = p.exits(&["run"], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gold.contacts.contact ← silver.people.email ← bronze.people.email"),
        "{err}"
    );
    assert!(err.contains("sql/gold/contacts.sql"), "{err}");
    assert!(err.contains("pseudonymize"), "{err}");
    // Nothing was written: the check runs before ingest.
    assert!(p.log_files().is_empty(), "{:?}", p.log_files());
    // `silt test` reports the same leak as a failing test.
    // (exit 2: the models are not built either, which `silt test` reports too.)
    let out = p.exits(&["--json", "test"], 2);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pii = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "pii_flow")
        .expect("a pii_flow result");
    assert_eq!(pii["status"], "fail");
    assert_eq!(pii["subject"], "gold.contacts.contact");
    assert!(
        pii["sample"]
            .as_str()
            .unwrap()
            .contains("gold.contacts.contact ← silver.people.email ← bronze.people.email")
    );

    // The same model with the column pseudonymized builds, and gold holds no address.
    write(
        p.path(),
        "sql/gold/contacts.sql",
        "{{ config(materialized='table', pseudonymize={'contact': 'hash'}) }}\n\
         select pid, lower(email) as contact, country from {{ ref('people') }}\n",
    );
    p.ok(&["run"]);
    let rows = p.query("select contact from gold.contacts");
    assert_eq!(rows.len(), 2);
    for r in rows {
        let c = r["contact"].as_str().unwrap();
        assert!(!c.contains('@') && c.len() == 64, "{c}");
    }
    // Declaring the column PII instead is accepted too (and shows in its lineage).
    write(
        p.path(),
        "sql/gold/contacts.sql",
        "{{ config(materialized='table', pii=['contact']) }}\n\
         select pid, lower(email) as contact, country from {{ ref('people') }}\n",
    );
    p.ok(&["run"]);
    let out = p.ok(&["lineage", "gold.contacts.contact"]);
    assert!(
        out.starts_with("gold.contacts.contact  (Utf8, PII)"),
        "{out}"
    );
    // A filter on PII is no leak: the value does not reach the output.
    write(
        p.path(),
        "sql/gold/contacts.sql",
        "{{ config(materialized='table') }}\n\
         select pid, country from {{ ref('people') }} where email like '%.com'\n",
    );
    p.ok(&["run"]);
}

#[test]
fn changed_shows_the_blast_radius_and_run_shows_the_old_lineage() {
    let p = Project::reference();
    p.ok(&["run"]);
    let first_run = crate::support::json(&p, &["runs"])
        .as_array()
        .unwrap()
        .first()
        .and_then(|r| r["run_id"].as_str().map(String::from))
        .expect("a run id");
    assert_eq!(
        p.ok(&["lineage", "--changed"]),
        "no change since the last run's lineage\n"
    );
    // A comment changes no column.
    let f = p.path().join("sql/silver/stg_fees.sql");
    let sql = std::fs::read_to_string(&f).unwrap();
    std::fs::write(&f, format!("{sql}\n-- a reviewer's note\n")).unwrap();
    assert_eq!(
        p.ok(&["lineage", "--changed"]),
        "no change since the last run's lineage\n"
    );
    // Negating the fee amount in silver changes that column and everything computed from it.
    assert!(sql.contains("fee_amount"), "{sql}");
    let changed_sql = sql.replacen("fee_amount,", "-fee_amount as fee_amount,", 1);
    assert_ne!(changed_sql, sql, "the test's edit must apply");
    std::fs::write(&f, &changed_sql).unwrap();
    let v: Value = serde_json::from_str(&p.ok(&["--json", "lineage", "--changed"])).unwrap();
    let changed = v["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{v}");
    assert_eq!(changed[0]["table"], "silver.stg_fees");
    assert_eq!(changed[0]["columns"], json!(["fee_amount"]), "{v}");
    let affected = v["affected"].as_object().unwrap();
    for (t, c) in [
        ("gold.rpt_client_ltv", "ltv_total"),
        ("gold.fct_monthly_revenue", "revenue"),
        ("gold.rpt_cohort_ltv", "revenue"),
    ] {
        assert!(
            affected[t].as_array().unwrap().iter().any(|x| x == c),
            "{t}.{c} not affected: {v}"
        );
    }
    // Columns that do not read the amount are not affected.
    assert!(
        !affected.get("gold.dim_clients").is_some_and(|a| a
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "city")),
        "{v}"
    );
    // After a build the new lineage is stored; the first run's is still there.
    p.ok(&["build"]);
    assert_eq!(
        p.ok(&["lineage", "--changed"]),
        "no change since the last run's lineage\n"
    );
    let now = p.ok(&["lineage", "silver.stg_fees.fee_amount"]);
    let then = p.ok(&["lineage", "silver.stg_fees.fee_amount", "--run", &first_run]);
    assert!(now.contains("(transformed"), "{now}");
    assert!(then.contains("bronze.fees.fee_amount  (copied"), "{then}");
    assert_ne!(now, then);
}

#[test]
fn a_fresh_init_project_has_lineage_and_docs() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("newproj");
    let out = std::process::Command::new(SILT)
        .arg("init")
        .arg(&proj)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(SILT)
            .arg("--project")
            .arg(&proj)
            .args(args)
            .env_remove("SILT_LAKE")
            .env_remove("SILT_LANDING")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The default site folder is ignored by the new project's git.
    let ignore = std::fs::read_to_string(proj.join(".gitignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "/target/"), "{ignore}");
    let site = run(&["--json", "docs", "--out", "site"]);
    let r: Value = serde_json::from_str(&site).unwrap();
    assert!(r["tables"].as_u64().unwrap() >= 2, "{r}");
    let data: Value =
        serde_json::from_str(&std::fs::read_to_string(proj.join("site/data.json")).unwrap())
            .unwrap();
    let model = data["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] != "source")
        .expect("a model in a new project");
    let col = format!(
        "{}.{}",
        model["table"].as_str().unwrap(),
        model["columns"][0]["name"].as_str().unwrap()
    );
    let tree = run(&["lineage", &col]);
    assert!(tree.contains("landing "), "{tree}");
    // Then built: the docs show rows and versions.
    run(&["run"]);
    run(&["docs", "--out", "site"]);
    let data: Value =
        serde_json::from_str(&std::fs::read_to_string(proj.join("site/data.json")).unwrap())
            .unwrap();
    assert!(
        data["tables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["stats"]["version"].is_u64()),
        "{data}"
    );
}

/// A Chrome DevTools Protocol session over the browser's websocket.
struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
    events: Vec<Value>,
    session: Option<String>,
}

impl Cdp {
    fn send(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let v = self.read();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    fn read(&mut self) -> Value {
        loop {
            match self.ws.read().expect("devtools socket") {
                tungstenite::Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                _ => continue,
            }
        }
    }

    fn wait_event(&mut self, method: &str) {
        if self.events.iter().any(|e| e["method"] == method) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no {method}");
            let v = self.read();
            let hit = v["method"] == method;
            self.events.push(v);
            if hit {
                return;
            }
        }
    }

    fn eval(&mut self, js: &str) -> Value {
        let r = self.send(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Console errors, uncaught exceptions and failed loads the page reported.
    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => Some(e["params"].to_string()),
                Some("Runtime.consoleAPICalled") if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                Some("Log.entryAdded") if e["params"]["entry"]["level"] == "error" => {
                    Some(e["params"]["entry"].to_string())
                }
                _ => None,
            })
            .collect()
    }
}

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("SILT_CHROMIUM") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in ["chromium", "chromium-browser"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "no Chromium: `make test` installs Debian's chromium (tests/browser/setup.sh); or set SILT_CHROMIUM"
    );
}

/// Kills the browser when the test ends, however it ends.
struct Browser(std::process::Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_docs_site_works_in_a_real_browser() {
    use std::io::BufRead;
    let p = Project::reference();
    p.ok(&["run"]);
    p.ok(&["docs", "--out", "site"]);
    let index = p.path().join("site/index.html");
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        // Chromium's own scratch directories go where the profile goes, and leave with it.
        .env("TMPDIR", profile.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let _browser = Browser(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("chromium printed no DevTools address");
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    let (ws, _) = tungstenite::connect(url.as_str()).expect("connect to DevTools");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let mut cdp = Cdp {
        ws,
        next: 0,
        events: vec![],
        session: None,
    };
    let target = cdp.send("Target.createTarget", json!({"url": "about:blank"}));
    let attached = cdp.send(
        "Target.attachToTarget",
        json!({"targetId": target["targetId"], "flatten": true}),
    );
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
        cdp.send(domain, json!({}));
    }
    cdp.events.clear();
    let file_url = url::Url::from_file_path(&index).unwrap().to_string();
    cdp.send("Page.navigate", json!({"url": file_url}));
    cdp.wait_event("Page.loadEventFired");

    // Every table of the project is listed.
    let listed: BTreeSet<String> = serde_json::from_value(
        cdp.eval("Array.from(document.querySelectorAll('.table-link')).map(a => a.dataset.table)"),
    )
    .unwrap();
    let data: Value =
        serde_json::from_str(&std::fs::read_to_string(p.path().join("site/data.json")).unwrap())
            .unwrap();
    let tables: BTreeSet<String> = data["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tables.len(), 11, "{tables:?}");
    assert_eq!(listed, tables);
    // The dag is drawn (a canvas inside the graph panel).
    assert_eq!(
        cdp.eval("document.querySelectorAll('#graph canvas').length > 0"),
        json!(true)
    );

    // Open a table, then click one of its columns: its lineage shows.
    cdp.eval("document.querySelector('.table-link[data-table=\"gold.rpt_client_ltv\"]').click()");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cdp.eval("document.querySelector('#table h2') ? document.querySelector('#table h2').textContent : ''")
        != json!("gold.rpt_client_ltv")
    {
        assert!(Instant::now() < deadline, "the table page did not open");
        std::thread::sleep(Duration::from_millis(100));
    }
    let table_text = cdp.eval("document.getElementById('table').innerText");
    let table_text = table_text.as_str().unwrap();
    assert!(
        table_text.contains("Lifetime value per client"),
        "{table_text}"
    );
    assert!(
        table_text.contains("Net fees of the client to date"),
        "{table_text}"
    );
    cdp.eval(
        "document.querySelector('button.column-link[data-column=\"gold.rpt_client_ltv.ltv_total\"]').click()",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let lineage = loop {
        let v = cdp.eval("document.getElementById('lineage').hidden ? '' : document.getElementById('lineage').innerText");
        let s = v.as_str().unwrap_or_default().to_string();
        if s.contains("Downstream") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no lineage shown after the click"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        lineage.contains("Lineage of gold.rpt_client_ltv.ltv_total"),
        "{lineage}"
    );
    let (up, down) = lineage.split_once("Downstream").unwrap();
    assert!(up.contains("silver.stg_fees.fee_amount"), "{lineage}");
    assert!(up.contains("bronze.fees.fee_amount"), "{lineage}");
    assert!(up.contains("landing fees/*.csv"), "{lineage}");
    assert!(down.contains("gold.rpt_adviser_ltv.revenue"), "{lineage}");
    assert!(!down.contains("silver.stg_fees.fee_amount"), "{lineage}");
    assert_eq!(
        cdp.eval("document.getElementById('graph-title').textContent"),
        json!("Lineage of gold.rpt_client_ltv.ltv_total")
    );

    // For people: a screenshot of that view.
    let shot = cdp.send("Page.captureScreenshot", json!({"format": "png"}));
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let shot_path = p.path().join("docs-lineage.png");
    std::fs::write(&shot_path, &png).unwrap();
    eprintln!("screenshot: {} ({} bytes)", shot_path.display(), png.len());
    // Keep it past the temp dir for humans, when asked.
    if let Some(dir) = std::env::var_os("SILT_SCREENSHOT_DIR") {
        let _ = std::fs::copy(&shot_path, Path::new(&dir).join("docs-lineage.png"));
    }

    let errors = cdp.errors();
    assert!(errors.is_empty(), "the page reported errors: {errors:#?}");
}

#[test]
fn erasure_follows_a_renamed_subject_key_through_lineage_but_not_a_mixed_column() {
    let p = orders_project();
    // The customer key renamed in a history-keeping model: lineage says `buyer` is o_custkey
    // copied, so the rows of customer 42 are deleted in place (by name alone it would be
    // rebuilt from scratch). `party` mixes customer and product ids: not a key,
    // so that model is rebuilt from the erased sources and product 42 stays.
    write(
        p.path(),
        "sql/gold/buyers.sql",
        "{{ config(materialized='incremental', unique_key='buyer') }}\n\
         select o_custkey as buyer, sum(o_totalprice) as spent from {{ source('orders') }} group by o_custkey\n",
    );
    write(p.path(), "sql/gold/parties.sql", PARTIES_SQL);
    p.ok(&["run"]);
    assert_eq!(
        p.count("select count(*) from gold.buyers where buyer = 42"),
        1
    );
    let r = crate::support::json(&p, &["forget", "42"]);
    let steps = r["steps"].as_array().unwrap();
    let step = |t: &str| -> Vec<String> {
        steps
            .iter()
            .filter(|s| s["table"] == t && s["action"] != "purge")
            .map(|s| s["action"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(step("gold.buyers"), vec!["rewrite"], "{r}");
    assert_eq!(step("gold.parties"), vec!["rebuild"], "{r}");
    assert_eq!(
        p.count("select count(*) from gold.buyers where buyer = 42"),
        0
    );
    assert_eq!(p.count("select count(*) from gold.buyers"), 2);
    assert_eq!(
        crate::support::datasets::csv(&p, "select party, party_kind from gold.parties"),
        "party,party_kind\n1,product\n2,product\n41,customer\n42,product\n420,customer\n"
    );
    let v = p.ok(&["forget", "--verify", "42"]);
    assert!(v.contains(" 0 finding(s)"), "{v}");
}
