//! SQL text that silt writes into the statements it generates: quoted identifiers and string
//! literals, and the partition filter that keeps Delta file pruning working. It must not plan
//! or run SQL (time_travel.rs and the catalog's session do).

/// An identifier, double-quoted (so any column name is one).
pub fn ident(c: &str) -> String {
    format!("\"{}\"", c.replace('"', "\"\""))
}

/// A string as a single-quoted SQL literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `column IN (values)` for a partition column, `values` being SQL string literals. A string
/// column is compared as it is: wrapped in a cast, the filter no longer prunes partitions, and
/// the scan reads every file of the table instead of the touched partitions' files.
pub fn partition_in(column: &str, is_string: bool, values: &str) -> String {
    if is_string {
        format!("{} in ({values})", ident(column))
    } else {
        format!("cast({} as varchar) in ({values})", ident(column))
    }
}
