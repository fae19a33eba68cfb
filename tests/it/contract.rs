//! Unit checks of the contract types and value parsers.

use silt::project::contract::*;

#[test]
fn parses_nested_types() {
    let t =
        ColumnType::parse("struct<line1: string, postcode: string not null, tags: list<string>>")
            .unwrap();
    assert_eq!(
        t.to_string(),
        "struct<line1: string, postcode: string not null, tags: list<string>>"
    );
    assert!(ColumnType::parse("decimal(40,2)").is_err());
    assert!(
        ColumnType::parse("strin")
            .unwrap_err()
            .contains("unknown type")
    );
}

#[test]
fn decimals_are_exact_and_refuse_rounding() {
    assert_eq!(parse_decimal("-12.5", 12, 2).unwrap(), -1250);
    assert_eq!(parse_decimal("0.07", 12, 2).unwrap(), 7);
    assert!(parse_decimal("1.234", 12, 2).is_err());
    assert!(parse_decimal("12,50", 12, 2).is_err());
    assert!(parse_decimal("1234567890123", 12, 2).is_err());
    // Trailing zeros past the scale are exact; leading zeros take no precision.
    assert_eq!(parse_decimal("1.230", 12, 2).unwrap(), 123);
    assert_eq!(parse_decimal(" +000000000012.5 ", 12, 2).unwrap(), 1250);
    assert_eq!(parse_decimal("-.5", 12, 2).unwrap(), -50);
    assert_eq!(parse_decimal("7.", 12, 2).unwrap(), 700);
    assert_eq!(
        parse_decimal("9999999999.99", 12, 2).unwrap(),
        999_999_999_999
    );
    for bad in ["", "-", ".", "1.2.3", "1e3", "12 5", "--1", "٣"] {
        let e = parse_decimal(bad, 12, 2).unwrap_err();
        assert!(e.contains("is not a decimal number"), "{bad:?}: {e}");
    }
    assert!(
        parse_decimal("1.001", 12, 2)
            .unwrap_err()
            .contains("more than 2 decimal places")
    );
    // A value far too wide is refused, not wrapped around.
    let wide = "9".repeat(60);
    assert!(
        parse_decimal(&wide, 38, 2)
            .unwrap_err()
            .contains("does not fit")
    );
    assert_eq!(format_decimal(-1250, 2), "-12.50");
    assert_eq!(format_decimal(7, 2), "0.07");
}

#[test]
fn dates_follow_declared_formats() {
    let f = vec!["%Y-%m-%d".to_string(), "%d/%m/%Y".to_string()];
    assert_eq!(parse_date("1970-01-02", &f), Some(1));
    assert_eq!(parse_date("02/01/1970", &f), Some(1));
    assert_eq!(parse_date("2026-02-30", &f), None);
    assert_eq!(format_date(1), "1970-01-02");
}
