//! The expected gold tables of the reference pipeline, checked in under tests/golden, and
//! query output in a stable order to compare with them.

use super::repo;

pub const GOLD: [&str; 5] = [
    "dim_clients",
    "rpt_client_ltv",
    "rpt_cohort_ltv",
    "rpt_adviser_ltv",
    "fct_monthly_revenue",
];

/// CSV output with its rows sorted.
pub fn sorted_csv(out: &str) -> String {
    let mut lines: Vec<&str> = out.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let header = lines.remove(0);
    lines.sort();
    format!("{header}\n{}\n", lines.join("\n"))
}

/// The checked-in expected content of a gold table.
pub fn golden(g: &str) -> String {
    std::fs::read_to_string(repo().join("tests/golden").join(format!("{g}.csv"))).unwrap()
}
