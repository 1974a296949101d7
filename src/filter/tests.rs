//! Unit tests of the filter language: every grammar rule, every example of spec §3 on a matching
//! and a non-matching event, the semantics twinroute chose, printing, errors and explanations.

use super::ast::{CompareOp, Expr, Field, Function, Literal, Operand};
use super::{Filter, FilterError, MAX_DEPTH, MAX_FILTER_LEN};
use crate::event::{parse_structured, Attribute, CloudEvent, DataEncoding, EventData};
use bytes::Bytes;

/// An event from structured JSON: `attrs` is the members besides `specversion`/`id`/`source`.
fn event(attrs: &str) -> CloudEvent {
    let json = format!(r#"{{"specversion":"1.0","id":"e1","source":"adt.example",{attrs}}}"#);
    parse_structured(json.as_bytes()).unwrap_or_else(|p| panic!("{json}: {p:?}"))
}

/// A twin event of type `ty` with JSON `data`.
fn twin(ty: &str, subject: &str, data: &str) -> CloudEvent {
    event(&format!(
        r#""type":"Microsoft.DigitalTwins.Twin.{ty}","subject":"{subject}","datacontenttype":"application/json","data":{data}"#
    ))
}

/// Telemetry with `data` and no subject/datacontenttype unless given in `extra`.
fn telemetry(data: &str, extra: &str) -> CloudEvent {
    let json = format!(
        r#"{{"specversion":"1.0","id":"e1","source":"adt.example/digitaltwins/t1","type":"microsoft.iot.telemetry"{extra},"data":{data}}}"#
    );
    parse_structured(json.as_bytes()).unwrap_or_else(|p| panic!("{json}: {p:?}"))
}

fn body(data: &str) -> CloudEvent {
    event(&format!(r#""type":"t","data":{data}"#))
}

fn filter(text: &str) -> Filter {
    Filter::parse(text).unwrap_or_else(|e| panic!("{text}:\n{e}"))
}

/// Evaluates, checking that `explain` and a round trip through the canonical text agree.
fn m(text: &str, event: &CloudEvent) -> bool {
    let f = filter(text);
    let result = f.matches(event);
    assert_eq!(f.explain(event).matched, result, "explain disagrees on {text}:\n{}", f.explain(event));
    let again = filter(&f.to_string());
    assert_eq!(again.expr(), f.expr(), "round trip of {text} via {f}");
    assert_eq!(again.matches(event), result);
    // Fresh event: the body is read anew.
    assert_eq!(f.matches(&event.clone()), result);
    result
}

fn yes(text: &str, event: &CloudEvent) {
    assert!(m(text, event), "`{text}` should match {event:?}");
}

fn no(text: &str, event: &CloudEvent) {
    assert!(!m(text, event), "`{text}` should not match {event:?}");
}

fn err(text: &str) -> FilterError {
    match Filter::parse(text) {
        Ok(f) => panic!("`{text}` parsed as {:?}", f.expr()),
        Err(e) => e,
    }
}

fn attr(a: Attribute) -> Operand {
    Operand::Field(Field::Attribute(a))
}

fn path(p: &[&str]) -> Operand {
    Operand::Field(Field::Body(p.iter().map(|s| s.to_string()).collect()))
}

fn string(s: &str) -> Operand {
    Operand::Literal(Literal::String(s.into()))
}

fn cmp(left: Operand, op: CompareOp, right: Operand) -> Expr {
    Expr::Compare { op, left, right }
}

// ---------------------------------------------------------------------------------------------
// Spec §3 examples, each on a matching and a non-matching event.

#[test]
fn spec_not_telemetry_and_json() {
    let f = "type != 'microsoft.iot.telemetry' AND datacontenttype = 'application/json'";
    yes(f, &twin("Create", "t1", "{}"));
    no(f, &telemetry("{}", r#","datacontenttype":"application/json""#));
    no(f, &event(r#""type":"x","datacontenttype":"text/plain","data":"hi""#));
}

#[test]
fn spec_parenthesized_or() {
    let f = "(type != 'microsoft.iot.telemetry' OR datacontenttype = 'application/json') OR (specversion != '1.0')";
    yes(f, &twin("Update", "t1", "{}"));
    yes(f, &telemetry("{}", r#","datacontenttype":"application/json""#));
    no(f, &telemetry("{}", ""));
}

#[test]
fn spec_starts_with_model() {
    let f = "STARTS_WITH($body.$metadata.$model, 'dtmi:example:com:floor')";
    yes(f, &twin("Create", "f1", r#"{"$metadata":{"$model":"dtmi:example:com:floor4;2"}}"#));
    no(f, &twin("Create", "r1", r#"{"$metadata":{"$model":"dtmi:example:com:room;1"}}"#));
    no(f, &twin("Create", "r1", r#"{"$metadata":{}}"#));
}

#[test]
fn spec_ends_with_model() {
    let f = "ENDS_WITH($body.$metadata.$model, 'floor;1')";
    yes(f, &twin("Create", "f1", r#"{"$metadata":{"$model":"dtmi:example:com:floor;1"}}"#));
    no(f, &twin("Create", "f1", r#"{"$metadata":{"$model":"dtmi:example:com:floor;2"}}"#));
}

#[test]
fn spec_contains_subject() {
    let f = "CONTAINS(subject, 'twin-1')";
    yes(f, &twin("Delete", "my-twin-12", "{}"));
    no(f, &twin("Delete", "my-twin-2", "{}"));
    no(f, &telemetry("{}", ""));
}

#[test]
fn spec_dataschema() {
    let f = "dataschema = 'dtmi:example:com:floor4;2'";
    yes(f, &telemetry("{}", r#","dataschema":"dtmi:example:com:floor4;2""#));
    no(f, &telemetry("{}", r#","dataschema":"dtmi:example:com:floor4;1""#));
    no(f, &twin("Create", "t", "{}"));
}

#[test]
fn spec_type_or_type() {
    let f = "type = 'Microsoft.DigitalTwins.Twin.Create' OR type = 'microsoft.iot.telemetry'";
    yes(f, &twin("Create", "t", "{}"));
    yes(f, &telemetry("{}", ""));
    no(f, &twin("Update", "t", "{}"));
    // Values are case-sensitive.
    no(f, &event(r#""type":"Microsoft.IoT.Telemetry""#));
}

#[test]
fn spec_body_comparisons() {
    yes("$body.errorCode > 200", &body(r#"{"errorCode": 404}"#));
    no("$body.errorCode > 200", &body(r#"{"errorCode": 200}"#));
    yes("$body.temperature <= 5.5", &body(r#"{"temperature": 5.5}"#));
    yes("$body.temperature <= 5.5", &body(r#"{"temperature": 5}"#));
    no("$body.temperature <= 5.5", &body(r#"{"temperature": 5.51}"#));
    yes("$body.poweredOn = true", &body(r#"{"poweredOn": true}"#));
    no("$body.poweredOn = true", &body(r#"{"poweredOn": false}"#));
    no("$body.poweredOn = true", &body(r#"{"poweredOn": "true"}"#));
    yes("$body.prop != null", &body(r#"{"prop": 0}"#));
    no("$body.prop != null", &body(r#"{"prop": null}"#));
    no("$body.prop != null", &body(r#"{"other": 1}"#));
}

#[test]
fn whole_filter_literals() {
    let e = twin("Create", "t", "{}");
    yes("true", &e);
    no("false", &e);
    assert_eq!(filter("true").constant(), Some(true));
    assert_eq!(filter(" FALSE ").constant(), Some(false));
    assert_eq!(filter("type = 'x'").constant(), None);
    // Simplification makes more filters constant.
    assert_eq!(filter("'a' = 'a'").constant(), Some(true));
    assert_eq!(filter("type = 5").constant(), Some(false));
    assert_eq!(filter("false AND $body.x = 1").constant(), Some(false));
    assert_eq!(filter("specversion = '1.0'").constant(), Some(true));
    assert_eq!(filter("type != null").constant(), Some(true));
    assert_eq!(filter("subject != null").constant(), None);
    // `true`/`false` work as conditions anywhere (twinroute extension).
    yes("true AND type = 'Microsoft.DigitalTwins.Twin.Create'", &e);
    no("NOT true OR false", &e);
}

// ---------------------------------------------------------------------------------------------
// Grammar rules.

#[test]
fn every_filterable_attribute() {
    let e =
        event(r#""type":"T","subject":"S","dataschema":"D","datacontenttype":"application/json","data":{}"#);
    for (field, value) in [
        ("type", "T"),
        ("source", "adt.example"),
        ("subject", "S"),
        ("dataschema", "D"),
        ("datacontenttype", "application/json"),
        ("specversion", "1.0"),
        ("id", "e1"),
    ] {
        yes(&format!("{field} = '{value}'"), &e);
        no(&format!("{field} = '{value}x'"), &e);
        yes(&format!("'{value}' = {field}"), &e);
    }
}

#[test]
fn attributes_are_case_sensitive_and_unknown_names_are_errors() {
    let e = err("Type = 'x'");
    assert_eq!(e.offset, 0);
    assert_eq!(e.found, "`Type`");
    assert!(e
        .expected
        .contains("type, source, subject, dataschema, datacontenttype, specversion, id or $body.<path>"));
    assert_eq!(e.hint.as_deref(), Some("did you mean `type`? Field names are lower case and case-sensitive"));
    let e = err("subject = 'a' AND foo = 1");
    assert_eq!(e.offset, 18);
    assert_eq!(e.found, "`foo`");
    assert_eq!(e.hint, None);
    let e = err("time > '2021'");
    assert_eq!(e.hint.as_deref(), Some("`time` cannot be filtered on"));
    let e = err("$Body.x = 1");
    assert_eq!((e.offset, e.found.as_str()), (0, "`$Body`"));
    assert!(e.hint.unwrap().contains("`$body`"));
    let e = err("$data = 1");
    assert_eq!(e.found, "`$data`");
}

#[test]
fn body_paths() {
    let e = body(r#"{"a": {"b": {"c": "deep"}}, "$dtId": "t1", "x_1$": 1, "arr": [1, 2], "s": "str"}"#);
    yes("$body.a.b.c = 'deep'", &e);
    yes("$body.$dtId = 't1'", &e);
    yes("$body.x_1$ = 1", &e);
    yes("$body.a != null", &e);
    yes("$body != null", &e);
    no("$body = null", &e);
    // Traversing a non-object, or a missing member, is a missing field.
    no("$body.s.length = 3", &e);
    no("$body.s.length != 3", &e);
    no("$body.arr.x != 1", &e);
    no("$body.a.b.c.d != 'x'", &e);
    // Member names are case-sensitive.
    no("$body.A != null", &e);
    assert_eq!(
        filter("$body.$metadata.$model = 'm'").expr(),
        &cmp(path(&["$metadata", "$model"]), CompareOp::Eq, string("m"))
    );
    assert_eq!(
        filter("$body = null").expr(),
        &cmp(path(&[]), CompareOp::Eq, Operand::Literal(Literal::Null))
    );
    // Array elements cannot be addressed.
    let e = err("$body.arr.0 = 1");
    assert_eq!((e.offset, e.found.as_str()), (10, "`0`"));
    assert_eq!(e.hint.as_deref(), Some("array elements cannot be addressed in a filter"));
    let e = err("$body.arr[0] = 1");
    assert_eq!((e.offset, e.found.as_str()), (9, "`[`"));
    let e = err("$body. a = 1");
    assert_eq!(e.offset, 6);
    let e = err("$body.a. = 1");
    assert_eq!(e.offset, 8);
}

#[test]
fn body_null_json_and_keys_with_escapes() {
    let e = body(r#"{"\u0024model": "m", "n": null, "e": "it's \"q\"\n"}"#);
    yes("$body.$model = 'm'", &e);
    yes("$body.n = null", &e);
    yes("$body.e = 'it''s \"q\"\n'", &e);
    // The whole body can be null (binary mode; in structured mode `"data": null` is no data).
    let e = CloudEvent::from_parts(
        &[
            (Attribute::Id, "1"),
            (Attribute::Source, "s"),
            (Attribute::Type, "t"),
            (Attribute::SpecVersion, "1.0"),
        ],
        Some(EventData { bytes: Bytes::from_static(b"null"), encoding: DataEncoding::Json }),
    )
    .unwrap();
    yes("$body = null", &e);
    no("$body != null", &e);
    no("$body.a = null", &e);
}

#[test]
fn string_literals_and_quote_escapes() {
    let e = twin("Create", "it's", "{}");
    yes("subject = 'it''s'", &e);
    no("subject = 'its'", &e);
    assert_eq!(filter("subject = ''''").expr(), &cmp(attr(Attribute::Subject), CompareOp::Eq, string("'")));
    assert_eq!(filter("subject = ''").expr(), &cmp(attr(Attribute::Subject), CompareOp::Eq, string("")));
    assert_eq!(
        filter("subject = 'a''''b'").expr(),
        &cmp(attr(Attribute::Subject), CompareOp::Eq, string("a''b"))
    );
    // Anything else inside quotes is literal, backslashes and non-ASCII included.
    assert_eq!(
        filter(r"subject = 'a\n é AND'").expr(),
        &cmp(attr(Attribute::Subject), CompareOp::Eq, string(r"a\n é AND"))
    );
}

#[test]
fn number_literals() {
    let lit = |text: &str| match filter(&format!("$body.x = {text}")).expr() {
        Expr::Compare { right: Operand::Literal(l), .. } => l.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(lit("0"), Literal::Integer(0));
    assert_eq!(lit("-42"), Literal::Integer(-42));
    assert_eq!(lit("007"), Literal::Integer(7));
    assert_eq!(lit("9223372036854775807"), Literal::Integer(i64::MAX));
    assert_eq!(lit("-9223372036854775808"), Literal::Integer(i64::MIN));
    assert_eq!(lit("5.5"), Literal::Double(5.5));
    assert_eq!(lit("-0.25"), Literal::Double(-0.25));
    assert_eq!(lit("1e3"), Literal::Double(1000.0));
    assert_eq!(lit("1.5E-2"), Literal::Double(0.015));
    assert_eq!(lit("2e+2"), Literal::Double(200.0));
    assert_eq!(lit("true"), Literal::Bool(true));
    assert_eq!(lit("False"), Literal::Bool(false));
    assert_eq!(lit("NULL"), Literal::Null);
    let e = err("$body.x = 9223372036854775808");
    assert_eq!((e.offset, e.found.as_str()), (10, "`9223372036854775808`"));
    assert!(e.hint.unwrap().contains("doubles"));
    let e = err("$body.x = 1e999");
    assert_eq!(e.offset, 10);
    let e = err("$body.x = 1.");
    assert_eq!((e.offset, e.expected.as_str()), (12, "a digit after `.`"));
    let e = err("$body.x = .5");
    assert_eq!((e.offset, e.found.as_str()), (10, "`.`"));
    let e = err("$body.x = - 5");
    assert_eq!((e.offset, e.expected.as_str()), (11, "a digit after `-`"));
    let e = err("$body.x = 1e");
    assert_eq!(e.offset, 12);
}

#[test]
fn comparison_operators() {
    let e = body(r#"{"n": 5}"#);
    for (op, results) in [
        ("=", [false, true, false]),
        ("!=", [true, false, true]),
        ("<", [false, false, true]),
        ("<=", [false, true, true]),
        (">", [true, false, false]),
        (">=", [true, true, false]),
    ] {
        for (value, expected) in [4, 5, 6].into_iter().zip(results) {
            assert_eq!(m(&format!("$body.n {op} {value}"), &e), expected, "5 {op} {value}");
            // Operands in either order: `4 < $body.n` is `$body.n > 4`.
            let mirrored = match op {
                "<" => ">",
                "<=" => ">=",
                ">" => "<",
                ">=" => "<=",
                o => o,
            };
            assert_eq!(m(&format!("{value} {mirrored} $body.n"), &e), expected);
        }
    }
    // Spacing does not matter.
    yes("$body.n>=5", &e);
    yes("  $body.n\t<\n6 ", &e);
}

#[test]
fn fields_on_both_sides() {
    let e = event(r#""type":"t","subject":"t1","data":{"a": 1, "b": 1.0, "c": 2, "id": "t1", "o": {}}"#);
    yes("$body.a = $body.b", &e);
    yes("$body.a < $body.c", &e);
    yes("subject = $body.id", &e);
    yes("$body.id = subject", &e);
    no("$body.o = $body.o", &e);
    no("type = subject", &e);
    yes("type != subject", &e);
    yes("CONTAINS($body.id, subject)", &e);
}

#[test]
fn functions() {
    let e = twin("Create", "building-7/floor-2", r#"{"name": "Floor 2", "n": 2}"#);
    yes("STARTS_WITH(subject, 'building-7')", &e);
    no("STARTS_WITH(subject, 'floor')", &e);
    yes("ENDS_WITH(subject, 'floor-2')", &e);
    yes("CONTAINS(subject, '/')", &e);
    yes("CONTAINS(subject, '')", &e);
    no("CONTAINS(subject, 'Floor')", &e);
    // Literals on either side.
    yes("STARTS_WITH('building-7/floor-2/room-1', subject)", &e);
    yes("CONTAINS('a building-7/floor-2 b', subject)", &e);
    yes("ENDS_WITH('abc', 'bc')", &e);
    // Function names are case-insensitive.
    yes("starts_with(subject, 'b')", &e);
    yes("Ends_With($body.name, '2')", &e);
    yes("contains($body.name, 'oor')", &e);
    // Non-strings: false.
    no("CONTAINS($body.n, '2')", &e);
    no("STARTS_WITH(subject, 5)", &e);
    no("ENDS_WITH($body.missing, '')", &e);
    no("CONTAINS(dataschema, '')", &e);
    assert_eq!(
        filter("contains(subject, 'x')").expr(),
        &Expr::Call { func: Function::Contains, left: attr(Attribute::Subject), right: string("x") }
    );
}

#[test]
fn keywords_are_case_insensitive() {
    let e = twin("Create", "a", "{}");
    yes("subject = 'a' and type != 'x'", &e);
    yes("subject = 'b' Or subject = 'a'", &e);
    yes("not subject = 'b'", &e);
    yes("True", &e);
    no("fAlSe", &e);
}

#[test]
fn precedence_and_parentheses() {
    let e = twin("Create", "a", "{}");
    // AND binds tighter than OR: `F OR T AND F` is `F OR (T AND F)` = false.
    no("subject = 'x' OR subject = 'a' AND type = 'nope'", &e);
    yes("(subject = 'x' OR subject = 'a') AND type != 'nope'", &e);
    // NOT binds tighter than AND: `NOT F AND T`.
    yes("NOT subject = 'x' AND subject = 'a'", &e);
    no("NOT (subject = 'a' AND subject = 'a')", &e);
    yes("NOT NOT subject = 'a'", &e);
    yes("((((subject = 'a'))))", &e);
}

#[test]
fn tree_shapes() {
    let s = |v: &str| cmp(attr(Attribute::Subject), CompareOp::Eq, string(v));
    assert_eq!(
        filter("subject = 'a' OR subject = 'b' AND subject = 'c'").expr(),
        &Expr::Or(vec![s("a"), Expr::And(vec![s("b"), s("c")])])
    );
    assert_eq!(
        filter("subject = 'a' AND subject = 'b' AND subject = 'c'").expr(),
        &Expr::And(vec![s("a"), s("b"), s("c")])
    );
    assert_eq!(
        filter("(subject = 'a' AND subject = 'b') AND subject = 'c'").expr(),
        &Expr::And(vec![Expr::And(vec![s("a"), s("b")]), s("c")])
    );
    assert_eq!(
        filter("NOT subject = 'a' AND subject = 'b'").expr(),
        &Expr::And(vec![Expr::Not(Box::new(s("a"))), s("b")])
    );
    assert_eq!(
        filter("true = $body.on").expr(),
        &cmp(Operand::Literal(Literal::Bool(true)), CompareOp::Eq, path(&["on"]))
    );
}

// ---------------------------------------------------------------------------------------------
// Semantics.

#[test]
fn missing_fields_are_false_for_every_operator() {
    let no_subject = telemetry(r#"{"a": 1}"#, "");
    let text_body = event(r#""type":"t","datacontenttype":"text/plain","data":"plain""#);
    let binary = CloudEvent::from_parts(
        &[
            (Attribute::Id, "1"),
            (Attribute::Source, "s"),
            (Attribute::Type, "t"),
            (Attribute::SpecVersion, "1.0"),
        ],
        Some(EventData { bytes: Bytes::from_static(b"\x00\x01"), encoding: DataEncoding::Binary }),
    )
    .unwrap();
    let no_data = event(r#""type":"t""#);
    for op in ["=", "!=", "<", "<=", ">", ">="] {
        no(&format!("subject {op} 'x'"), &no_subject);
        no(&format!("dataschema {op} 'x'"), &no_subject);
        no(&format!("$body.b {op} 1"), &no_subject);
        no(&format!("$body.a.b {op} 1"), &no_subject);
        for e in [&text_body, &binary, &no_data] {
            no(&format!("$body.a {op} 1"), e);
            no(&format!("$body {op} null"), e);
        }
    }
    no("subject = null", &no_subject);
    no("subject != null", &no_subject);
    yes("subject != null", &twin("Create", "s", "{}"));
    no("subject = null", &twin("Create", "s", "{}"));
}

#[test]
fn not_differs_from_not_equal_on_missing_fields() {
    let no_subject = telemetry("{}", "");
    no("subject != 'x'", &no_subject);
    yes("NOT (subject = 'x')", &no_subject);
    no("$body.a != 1", &no_subject);
    yes("NOT $body.a = 1", &no_subject);
}

#[test]
fn type_mismatches_are_false_for_every_operator() {
    let e = body(r#"{"s": "5", "n": 5, "b": true, "o": {"k": 1}, "a": [1]}"#);
    for op in ["=", "!=", "<", "<=", ">", ">="] {
        no(&format!("$body.s {op} 5"), &e);
        no(&format!("$body.n {op} '5'"), &e);
        no(&format!("$body.b {op} 1"), &e);
        no(&format!("$body.b {op} 'true'"), &e);
        no(&format!("$body.n {op} true"), &e);
        no(&format!("$body.o {op} 'x'"), &e);
        no(&format!("$body.a {op} 1"), &e);
        no(&format!("$body.o {op} $body.o"), &e);
        no(&format!("$body.o {op} $body.a"), &e);
        no(&format!("type {op} 5"), &e);
        no(&format!("type {op} false"), &e);
    }
}

#[test]
fn null_semantics() {
    let e = body(r#"{"z": null, "n": 0, "s": "", "f": false, "o": {}, "a": []}"#);
    yes("$body.z = null", &e);
    no("$body.z != null", &e);
    yes("null = $body.z", &e);
    for present in ["n", "s", "f", "o", "a"] {
        no(&format!("$body.{present} = null"), &e);
        yes(&format!("$body.{present} != null"), &e);
    }
    no("$body.missing = null", &e);
    no("$body.missing != null", &e);
    // null equals only null: a null field differs from any other present value.
    yes("$body.z != 5", &e);
    yes("$body.z != 'x'", &e);
    no("$body.z = 0", &e);
    yes("$body.z = $body.z", &e);
    yes("$body.z != $body.n", &e);
    // No order with null.
    for op in ["<", "<=", ">", ">="] {
        no(&format!("$body.z {op} null"), &e);
        no(&format!("$body.n {op} null"), &e);
    }
    yes("null = null", &e);
    no("null != null", &e);
}

#[test]
fn numbers_compare_numerically_across_int_and_double() {
    let e = body(
        r#"{"i": 5, "d": 5.0, "h": 5.5, "neg": -3, "big": 18446744073709551615, "max": 9223372036854775807,
            "e": 1e3, "huge": 1e300, "tiny": -1e300, "nine": 9007199254740993}"#,
    );
    yes("$body.i = 5.0", &e);
    yes("$body.d = 5", &e);
    yes("$body.i = $body.d", &e);
    yes("$body.h > 5", &e);
    yes("$body.h < 6", &e);
    no("$body.h = 5", &e);
    yes("$body.neg < -2.5", &e);
    yes("$body.e = 1000", &e);
    yes("$body.big > 9223372036854775807", &e);
    yes("$body.big > $body.max", &e);
    no("$body.big = 1.8446744073709552e19", &e); // u64::MAX is one less than 2^64
    yes("$body.big < 1.8446744073709552e19", &e);
    yes("$body.big >= 1.8446744073709550e19", &e);
    no("$body.max = 9.223372036854776e18", &e); // 2^63 as a double is one more than i64::MAX
    yes("$body.max < 9.223372036854776e18", &e);
    yes("$body.huge > $body.big", &e);
    yes("$body.tiny < -9223372036854775808", &e);
    // Exact comparison of a large integer with a double (2^53 + 1 is not a double).
    no("$body.nine = 9007199254740992.0", &e);
    yes("$body.nine > 9007199254740992.0", &e);
    yes("$body.nine = 9007199254740993", &e);
    yes("1 < 1.5", &e);
    yes("-0.0 = 0", &e);
}

#[test]
fn strings_compare_by_bytes_case_sensitively() {
    let e = twin("Create", "b", r#"{"u": "é", "z": "z", "up": "B"}"#);
    yes("subject > 'a'", &e);
    yes("subject < 'c'", &e);
    yes("subject >= 'b'", &e);
    yes("subject > 'B'", &e); // 'b' (0x62) > 'B' (0x42)
    yes("$body.up < 'a'", &e);
    no("subject = 'B'", &e);
    yes("$body.u > $body.z", &e); // UTF-8 bytes: é is 0xC3 0xA9
    yes("'abc' < 'abd'", &e);
    yes("'ab' < 'abc'", &e);
    yes("'' < 'a'", &e);
    yes("'10' < '9'", &e);
}

#[test]
fn booleans_only_compare_for_equality() {
    let e = body(r#"{"t": true, "f": false}"#);
    yes("$body.t = true", &e);
    yes("$body.t != false", &e);
    yes("$body.t != $body.f", &e);
    yes("$body.f = FALSE", &e);
    for op in ["<", "<=", ">", ">="] {
        no(&format!("$body.t {op} false"), &e);
        no(&format!("$body.f {op} $body.t"), &e);
    }
}

#[test]
fn duplicate_members_last_one_counts() {
    let e = body(r#"{"a": 1, "a": 2}"#);
    yes("$body.a = 2", &e);
    assert_eq!(e.body().unwrap()["a"], 2); // the same as serde_json
}

// ---------------------------------------------------------------------------------------------
// Printing.

#[test]
fn canonical_text() {
    for (input, canonical) in [
        ("true", "true"),
        ("False", "false"),
        ("type='a'", "type = 'a'"),
        ("type = 'it''s'", "type = 'it''s'"),
        ("$body.x>=1.50", "$body.x >= 1.5"),
        ("$body.x = 1e3", "$body.x = 1000.0"),
        ("$body.x = 1e20", "$body.x = 1e20"),
        ("$body.x=-7", "$body.x = -7"),
        ("$body.x != NULL", "$body.x != null"),
        ("$body.x = TRUE", "$body.x = true"),
        ("starts_with(subject,'a')", "STARTS_WITH(subject, 'a')"),
        ("subject = 'a' or subject = 'b' and type = 'c'", "subject = 'a' OR subject = 'b' AND type = 'c'"),
        (
            "(subject = 'a' or subject = 'b') and type = 'c'",
            "(subject = 'a' OR subject = 'b') AND type = 'c'",
        ),
        (
            "(subject = 'a' and subject = 'b') and type = 'c'",
            "(subject = 'a' AND subject = 'b') AND type = 'c'",
        ),
        ("((subject = 'a'))", "subject = 'a'"),
        ("not subject = 'a'", "NOT subject = 'a'"),
        ("not (subject = 'a')", "NOT subject = 'a'"),
        ("not not true", "NOT NOT true"),
        ("not contains(subject, 'a')", "NOT CONTAINS(subject, 'a')"),
        ("not (subject = 'a' or true)", "NOT (subject = 'a' OR true)"),
        ("NOT subject = 'a' AND true", "NOT subject = 'a' AND true"),
        (
            "(NOT subject = 'a') OR NOT (subject = 'b' AND true)",
            "NOT subject = 'a' OR NOT (subject = 'b' AND true)",
        ),
    ] {
        let f = filter(input);
        assert_eq!(f.to_string(), canonical, "{input}");
        assert_eq!(f.text(), input);
        assert_eq!(filter(canonical).expr(), f.expr());
    }
}

#[test]
fn hand_built_trees_print_and_reparse() {
    let s = |v: &str| cmp(attr(Attribute::Subject), CompareOp::Eq, string(v));
    let tree = Expr::And(vec![
        Expr::Or(vec![s("a"), Expr::Not(Box::new(Expr::Or(vec![s("b"), s("c")])))]),
        Expr::And(vec![s("d"), Expr::Const(false)]),
        Expr::Call { func: Function::EndsWith, left: string("x'y"), right: path(&["$a", "b_2"]) },
        cmp(
            Operand::Literal(Literal::Double(-1.5e-7)),
            CompareOp::Ge,
            Operand::Literal(Literal::Integer(i64::MIN)),
        ),
    ]);
    let f = Filter::from_expr(tree.clone());
    assert_eq!(
        f.text(),
        "(subject = 'a' OR NOT (subject = 'b' OR subject = 'c')) AND (subject = 'd' AND false) AND ENDS_WITH('x''y', $body.$a.b_2) AND -1.5e-7 >= -9223372036854775808"
    );
    assert_eq!(filter(f.text()).expr(), &tree);
    assert_eq!(Expr::And(vec![]).to_string(), "true");
    assert_eq!(Expr::Or(vec![]).to_string(), "false");
}

// ---------------------------------------------------------------------------------------------
// Errors: offsets, messages and the caret rendering.

#[test]
fn error_empty_filter() {
    let e = err("");
    assert_eq!(
        (e.offset, e.expected.as_str(), e.found.as_str()),
        (0, "a condition", "the end of the filter")
    );
    assert_eq!(
        e.to_string(),
        "expected a condition, found the end of the filter at offset 0\n\n^\nhint: a filter that matches every event is `true`"
    );
    let e = err("   ");
    assert_eq!(e.offset, 3);
    assert_eq!(e.to_string().lines().nth(2), Some("   ^"));
}

#[test]
fn error_unterminated_string() {
    let e = err("subject = 'abc");
    assert_eq!(e.offset, 10);
    assert_eq!(e.found, "the end of the filter");
    assert_eq!(
        e.to_string(),
        "expected a closing `'` for the string that starts here, found the end of the filter at offset 10\n\
         subject = 'abc\n          ^\nhint: a quote inside a string is written twice: 'it''s'"
    );
    // An escaped quote at the end does not close it.
    assert_eq!(err("subject = 'abc''").offset, 10);
}

#[test]
fn error_missing_operand() {
    let e = err("type = ");
    assert_eq!((e.offset, e.found.as_str()), (7, "the end of the filter"));
    assert_eq!(e.expected, "a value (a field or a literal)");
    assert_eq!(
        e.to_string(),
        "expected a value (a field or a literal), found the end of the filter at offset 7\ntype = \n       ^"
    );
    let e = err("type = AND subject = 'x'");
    assert_eq!((e.offset, e.found.as_str()), (7, "`AND`"));
    let e = err("= 'x'");
    assert_eq!((e.offset, e.found.as_str(), e.expected.as_str()), (0, "`=`", "a condition"));
    let e = err("type 'x'");
    assert_eq!((e.offset, e.found.as_str()), (5, "`'x'`"));
    assert_eq!(e.expected, "a comparison operator (=, !=, <, <=, >, >=)");
    let e = err("$body.flag");
    assert_eq!((e.offset, e.found.as_str()), (10, "the end of the filter"));
    assert!(e.hint.unwrap().contains("a field alone is not a condition"));
    let e = err("type = 'a' AND");
    assert_eq!(
        (e.offset, e.found.as_str(), e.expected.as_str()),
        (14, "the end of the filter", "a condition after AND")
    );
    // As the README shows it.
    assert_eq!(
        e.to_string(),
        "expected a condition after AND, found the end of the filter at offset 14\ntype = 'a' AND\n              ^"
    );
    let e = err("type = 'a' OR OR type = 'b'");
    assert_eq!((e.offset, e.found.as_str(), e.expected.as_str()), (14, "`OR`", "a condition after OR"));
    let e = err("NOT");
    assert_eq!((e.offset, e.expected.as_str()), (3, "a condition after NOT"));
    let e = err("(type = 'a' AND)");
    assert_eq!((e.offset, e.found.as_str(), e.expected.as_str()), (15, "`)`", "a condition after AND"));
    let e = err("NOT = 1");
    assert_eq!((e.offset, e.found.as_str()), (4, "`=`"));
}

#[test]
fn error_unbalanced_parentheses() {
    let e = err("(type = 'a'");
    assert_eq!(
        (e.offset, e.found.as_str(), e.expected.as_str()),
        (11, "the end of the filter", "`AND`, `OR` or `)`")
    );
    assert_eq!(e.hint.as_deref(), Some("the `(` at offset 0 is not closed"));
    assert_eq!(
        e.to_string(),
        "expected `AND`, `OR` or `)`, found the end of the filter at offset 11\n(type = 'a'\n           ^\nhint: the `(` at offset 0 is not closed"
    );
    let e = err("type = 'a')");
    assert_eq!((e.offset, e.found.as_str()), (10, "`)`"));
    assert!(e.expected.contains("no matching `(`"));
    let e = err("()");
    assert_eq!((e.offset, e.found.as_str()), (1, "`)`"));
    let e = err("((type = 'a') OR (subject = 'b')");
    assert_eq!(e.offset, 32);
}

#[test]
fn error_trailing_garbage() {
    let e = err("type = 'a' xyz");
    assert_eq!(
        (e.offset, e.found.as_str(), e.expected.as_str()),
        (11, "`xyz`", "`AND`, `OR` or the end of the filter")
    );
    assert_eq!(
        e.to_string(),
        "expected `AND`, `OR` or the end of the filter, found `xyz` at offset 11\ntype = 'a' xyz\n           ^"
    );
    let e = err("true false");
    assert_eq!(e.offset, 5);
    let e = err("type = 'a' 'b'");
    assert_eq!((e.offset, e.found.as_str()), (11, "`'b'`"));
    let e = err("$body.n = 5abc");
    assert_eq!((e.offset, e.found.as_str()), (11, "`abc`"));
}

#[test]
fn error_function_arity_and_names() {
    let e = err("STARTS_WITH(subject)");
    assert_eq!((e.offset, e.found.as_str(), e.expected.as_str()), (19, "`)`", "`,`"));
    assert_eq!(e.hint.as_deref(), Some("STARTS_WITH takes 2 arguments"));
    assert_eq!(
        e.to_string(),
        "expected `,`, found `)` at offset 19\nSTARTS_WITH(subject)\n                   ^\nhint: STARTS_WITH takes 2 arguments"
    );
    let e = err("CONTAINS(subject, 'a', 'b')");
    assert_eq!((e.offset, e.found.as_str(), e.expected.as_str()), (21, "`,`", "`)`"));
    assert_eq!(e.hint.as_deref(), Some("CONTAINS takes 2 arguments"));
    let e = err("ENDS_WITH()");
    assert_eq!((e.offset, e.found.as_str()), (10, "`)`"));
    assert_eq!(e.expected, "an argument of ENDS_WITH (a field or a literal)");
    let e = err("LOWER(subject) = 'a'");
    assert_eq!((e.offset, e.found.as_str()), (0, "`LOWER`"));
    assert_eq!(e.expected, "a function: STARTS_WITH, ENDS_WITH or CONTAINS");
    let e = err("STARTS_WITH(subject, 'a') = true");
    assert_eq!((e.offset, e.found.as_str()), (26, "`=`"));
}

#[test]
fn error_hints_for_other_languages() {
    let e = err("type == 'a'");
    assert_eq!((e.offset, e.hint.as_deref()), (5, Some("equality is written with a single `=`")));
    let e = err("type <> 'a'");
    assert_eq!((e.offset, e.hint.as_deref()), (5, Some("inequality is written `!=`")));
    let e = err("type = \"a\"");
    assert_eq!((e.offset, e.found.as_str()), (7, "`\"`"));
    assert!(e.hint.unwrap().contains("single quotes"));
    assert_eq!(err("type = 'a' && true").hint.as_deref(), Some("conjunction is written `AND`"));
    assert_eq!(err("type = 'a' || true").hint.as_deref(), Some("disjunction is written `OR`"));
    assert!(err("!true").hint.unwrap().contains("NOT"));
}

#[test]
fn error_caret_counts_characters_and_shows_the_right_line() {
    let e = err("subject = 'é' AND x");
    assert_eq!(e.offset, 19); // bytes: é is two
    assert_eq!(e.to_string().lines().nth(2), Some("                  ^"));
    let e = err("type = 'a'\n  AND\tfoo = 1");
    assert_eq!(e.offset, 17);
    let shown = e.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines[1], "  AND\tfoo = 1");
    assert_eq!(lines[2], "     \t^");
    let e = err("subject = 'a' AND ✓");
    assert_eq!((e.offset, e.found.as_str()), (18, "`✓`"));
}

#[test]
fn error_limits() {
    let long = format!("subject = '{}'", "x".repeat(MAX_FILTER_LEN));
    let e = err(&long);
    assert_eq!(e.offset, MAX_FILTER_LEN);
    assert_eq!(e.expected, "a filter of at most 4096 bytes");
    assert_eq!(e.found, format!("{} bytes", long.len()));
    assert_eq!(e.text().len(), MAX_FILTER_LEN);
    // Just at the limit is fine.
    let at_limit = format!("subject = '{}'", "x".repeat(MAX_FILTER_LEN - 12));
    assert_eq!(at_limit.len(), MAX_FILTER_LEN);
    filter(&at_limit);

    let nested = |n: usize| format!("{}true{}", "(".repeat(n), ")".repeat(n));
    filter(&nested(MAX_DEPTH));
    let e = err(&nested(MAX_DEPTH + 1));
    assert_eq!((e.offset, e.found.as_str()), (MAX_DEPTH, "nesting level 65"));
    assert_eq!(e.expected, "at most 64 nested parentheses and NOTs");
    let nots = |n: usize| format!("{}true", "NOT ".repeat(n));
    filter(&nots(MAX_DEPTH));
    // At the limit, the canonical text stays within it (found by fuzzing).
    let at_limit = filter(&format!("{}type = 'x'", "NOT ".repeat(MAX_DEPTH)));
    filter(&at_limit.to_string());
    assert_eq!(err(&nots(MAX_DEPTH + 1)).offset, 4 * MAX_DEPTH);
    // Hostile input far beyond the limits is refused without recursion.
    assert_eq!(err(&"(".repeat(4000)).offset, MAX_DEPTH);
    assert_eq!(err(&"(".repeat(100_000)).offset, MAX_FILTER_LEN);
    // Long flat chains are fine: they do not nest.
    let chain = vec!["subject = 'a'"; 200].join(" OR ");
    assert!(chain.len() < MAX_FILTER_LEN);
    assert!(filter(&chain).matches(&twin("Create", "a", "{}")));
    let segments = vec!["a"; 33].join(".");
    let e = err(&format!("$body.{segments} = 1"));
    assert_eq!((e.offset, e.found.as_str()), (0, "33 properties"));
    filter(&format!("$body.{} = 1", vec!["a"; 32].join(".")));
}

// ---------------------------------------------------------------------------------------------
// Explanations, API details.

#[test]
fn explanations() {
    let e = twin("Create", "t1", r#"{"temperature": 21.5, "s": "21", "o": {"x": 1}}"#);
    let x = filter("$body.temperature > 30").explain(&e);
    assert!(!x.matched);
    assert_eq!(x.to_string(), "`$body.temperature > 30` is false: $body.temperature is 21.5");
    let x = filter("dataschema = 'x'").explain(&e);
    assert_eq!(x.to_string(), "`dataschema = 'x'` is false: the event has no dataschema");
    let x =
        filter("type = 'Microsoft.DigitalTwins.Twin.Create' AND ($body.temperature > 30 OR subject = 't1')")
            .explain(&e);
    assert!(x.matched);
    assert_eq!(
        x.to_string(),
        "`type = 'Microsoft.DigitalTwins.Twin.Create' AND ($body.temperature > 30 OR subject = 't1')` is true\n\
         \x20 `type = 'Microsoft.DigitalTwins.Twin.Create'` is true: type is 'Microsoft.DigitalTwins.Twin.Create'\n\
         \x20 `$body.temperature > 30 OR subject = 't1'` is true\n\
         \x20   `$body.temperature > 30` is false: $body.temperature is 21.5\n\
         \x20   `subject = 't1'` is true: subject is 't1'"
    );
    assert_eq!(x.clauses.len(), 5);
    assert_eq!(x.clauses[3].depth, 2);
    let reason = |text: &str| filter(text).explain(&e).clauses[0].reason.clone();
    assert_eq!(reason("$body.s > 20"), "$body.s is '21' (a string and a number never compare, even with !=)");
    assert_eq!(reason("$body.nope = 1"), "$body.nope is not in the body");
    assert_eq!(reason("$body.s.x = 1"), "$body.s.x is not in the body ($body.s is '21', not an object)");
    assert_eq!(reason("$body.a.b.c = 1"), "$body.a.b.c is not in the body ($body.a is not there)");
    assert_eq!(reason("$body.o = 1"), "$body.o is an object (objects and arrays only compare with null)");
    assert_eq!(reason("'a' = 'b'"), "both sides are literals");
    assert_eq!(reason("true"), "always");
    assert_eq!(
        reason("CONTAINS($body.temperature, '2')"),
        "$body.temperature is 21.5 (CONTAINS needs two strings)"
    );
    assert_eq!(reason("subject = $body.s"), "subject is 't1', $body.s is '21'");
    let x = filter("$body.x = 1").explain(&event(r#""type":"t""#));
    assert_eq!(x.clauses[0].reason, "the event has no JSON body");
    let x = filter("NOT subject = 'x'").explain(&e);
    assert_eq!(x.to_string(), "`NOT subject = 'x'` is true\n  `subject = 'x'` is false: subject is 't1'");
}

#[test]
fn api_details() {
    let f = filter("  $body.a = 1 and type = 'x' ");
    assert_eq!(f.text(), "  $body.a = 1 and type = 'x' ");
    assert_eq!(f.to_string(), "$body.a = 1 AND type = 'x'");
    assert!(f.reads_body());
    assert!(!filter("type = 'x'").reads_body());
    // reads_body is about the tree as written.
    assert!(filter("false AND $body.a = 1").reads_body());
    assert_eq!(format!("{f:?}"), r#"Filter("  $body.a = 1 and type = 'x' ")"#);
    assert_eq!(f, filter("$body.a=1 AND type='x'"));
    assert_ne!(f, filter("type = 'x' AND $body.a = 1"));
    let parsed: Filter = "type = 'x'".parse().unwrap();
    assert_eq!(parsed.text(), "type = 'x'");
    let json = serde_json::to_string(&f).unwrap();
    assert_eq!(json, r#""  $body.a = 1 and type = 'x' ""#);
    let back: Filter = serde_json::from_str(&json).unwrap();
    assert_eq!(back, f);
    let bad = serde_json::from_str::<Filter>(r#""type =""#).unwrap_err();
    assert!(bad.to_string().starts_with("expected a value"));
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Filter>();
}
