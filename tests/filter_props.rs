//! Property tests of the route filter language:
//! 1. the canonical text of any tree parses back to the same tree;
//! 2. evaluation never panics, and agrees with `explain` and with a naive reference evaluator that
//!    reads the body through `CloudEvent::body()` (serde_json), on odd bodies too;
//! 3. parsing any string never panics, and errors point inside the text;
//! 4. a route table sends an event to exactly the endpoints of the routes whose filters match.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use std::cmp::Ordering;
use twinroute::event::{parse_structured, Attribute, CloudEvent, DataEncoding, EventData};
use twinroute::filter::ast::{CompareOp, Expr, Field, Function, Literal, Operand, FILTERABLE_ATTRIBUTES};
use twinroute::filter::{Filter, MAX_FILTER_LEN};
use twinroute::routing::{Route, RouteTable};

// ---------------------------------------------------------------------------------------------
// Generators.

/// Member names: a few that bodies use too (so paths hit), and arbitrary valid ones.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "$m", "x_1", "A"]).prop_map(str::to_owned),
        1 => "[A-Za-z_$][A-Za-z0-9_$]{0,6}",
    ]
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        prop::sample::select(FILTERABLE_ATTRIBUTES.to_vec()).prop_map(Field::Attribute),
        prop::collection::vec(segment(), 0..4).prop_map(Field::Body),
    ]
}

fn nice_double() -> impl Strategy<Value = f64> {
    prop_oneof![
        prop::sample::select(vec![0.5, 1.0, 2.5, -0.0, -1.5, 1e20]),
        (-1000i32..1000).prop_map(|i| f64::from(i) / 4.0),
    ]
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        prop::sample::select(vec!["", "a", "ab", "b", "A", "é", "it's", "1.0"])
            .prop_map(|s| Literal::String(s.to_owned())),
        ".{0,12}".prop_map(Literal::String),
        prop::sample::select(vec![-1i64, 0, 1, 2, 5, i64::MAX, i64::MIN]).prop_map(Literal::Integer),
        any::<i64>().prop_map(Literal::Integer),
        nice_double().prop_map(Literal::Double),
        // Any finite double (printing must round-trip them all).
        any::<f64>().prop_filter("finite", |d| d.is_finite()).prop_map(Literal::Double),
        any::<bool>().prop_map(Literal::Bool),
        Just(Literal::Null),
    ]
}

fn operand() -> impl Strategy<Value = Operand> {
    prop_oneof![field().prop_map(Operand::Field), literal().prop_map(Operand::Literal)]
}

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        1 => any::<bool>().prop_map(Expr::Const),
        6 => (prop::sample::select(CompareOp::ALL.to_vec()), operand(), operand())
            .prop_map(|(op, left, right)| Expr::Compare { op, left, right }),
        2 => (prop::sample::select(Function::ALL.to_vec()), operand(), operand())
            .prop_map(|(func, left, right)| Expr::Call { func, left, right }),
    ]
}

/// Trees as the parser produces them: `AND`/`OR` with at least two operands.
fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(5, 40, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::Or),
            inner.prop_map(|e| Expr::Not(Box::new(e))),
        ]
    })
}

/// JSON bodies whose members often have the names paths use.
fn json() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![-1i64, 0, 1, 2, 5, i64::MAX, i64::MIN]).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        nice_double().prop_map(Value::from),
        prop::sample::select(vec!["", "a", "ab", "b", "A", "é", "it's", "1.0", "q\"\\\n"])
            .prop_map(Value::from),
    ];
    scalar.prop_recursive(4, 30, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec((segment(), inner), 0..5)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

fn event_with_data(data: Option<EventData>, subject: Option<&str>) -> CloudEvent {
    let mut attrs = vec![
        (Attribute::SpecVersion, "1.0"),
        (Attribute::Id, "id-1"),
        (Attribute::Source, "adt.example"),
        (Attribute::Type, "a"),
    ];
    if let Some(s) = subject {
        attrs.push((Attribute::Subject, s));
        attrs.push((Attribute::DataSchema, "ab"));
    }
    CloudEvent::from_parts(&attrs, data).expect("valid event")
}

fn json_event(body: &Value, subject: Option<&str>) -> CloudEvent {
    let bytes = serde_json::to_vec(body).unwrap();
    event_with_data(Some(EventData { bytes: bytes.into(), encoding: DataEncoding::Json }), subject)
}

/// Events with odd bodies that generated JSON does not cover.
fn odd_events() -> Vec<CloudEvent> {
    let raw = |text: &[u8]| {
        event_with_data(
            Some(EventData { bytes: Bytes::copy_from_slice(text), encoding: DataEncoding::Json }),
            Some("a"),
        )
    };
    // Accepted as events, but not JSON serde_json parses: no body, whichever way it is read.
    let deep = format!(r#"{{"a": 1, "b": {}{}}}"#, "[".repeat(130), "]".repeat(130));
    vec![
        event_with_data(None, None),
        event_with_data(
            Some(EventData { bytes: Bytes::from_static(b"a"), encoding: DataEncoding::Text }),
            Some("b"),
        ),
        event_with_data(
            Some(EventData { bytes: Bytes::from_static(b"\xff\x00"), encoding: DataEncoding::Binary }),
            None,
        ),
        raw(br#"{"a": 1, "b": [1e400]}"#),
        raw(br#"{"a": 1, "b": "\ud800"}"#),
        raw(b"{\"a\": 1, \"b\": \"\xff\"}"),
        raw(deep.as_bytes()),
        raw(b"null"),
        raw(b"  17  "),
        raw(br#""a""#),
        raw(b"[1, {\"a\": 1}]"),
        raw(br#"{"a": 1, "a": {"b": 2}, "b": [{"a": "x"}]}"#),
        raw(br#"{"\u0061": "\u00e9", "$m": {"x_1": 1e2, "A": -0}, "b": 18446744073709551615}"#),
        raw(br#"{"a":{"a":{"a":{"a":{"a":{"a":"deep"}}}}}}"#),
        parse_structured(br#"{"specversion":"1.0","id":"1","source":"s","type":"ab","subject":"A","data":{"a":"ab","b":2.5}}"#).unwrap(),
    ]
}

// ---------------------------------------------------------------------------------------------
// A naive reference evaluator: serde_json `Value`s from `CloudEvent::body()`.

#[derive(Debug, Clone, Copy)]
enum Ref<'a> {
    Missing,
    Json(&'a Value),
    Str(&'a str),
}

fn reference_value<'a>(operand: &'a Operand, event: &'a CloudEvent) -> Ref<'a> {
    match operand {
        Operand::Field(Field::Attribute(a)) => event.attribute(*a).map_or(Ref::Missing, Ref::Str),
        Operand::Field(Field::Body(path)) => {
            let mut value = match event.body() {
                Some(v) => v,
                None => return Ref::Missing,
            };
            for segment in path {
                value = match value.as_object().and_then(|o| o.get(segment)) {
                    Some(v) => v,
                    None => return Ref::Missing,
                };
            }
            Ref::Json(value)
        }
        Operand::Literal(_) => unreachable!("literals are converted by the caller"),
    }
}

fn literal_json(literal: &Literal) -> Value {
    match literal {
        Literal::String(s) => Value::from(s.as_str()),
        Literal::Integer(i) => Value::from(*i),
        Literal::Double(d) => Value::from(*d),
        Literal::Bool(b) => Value::Bool(*b),
        Literal::Null => Value::Null,
    }
}

/// Exact order of two JSON numbers, written independently of the crate's version: compare as
/// f64 first, and fall back to integers when the doubles tie.
fn number_order(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    let int = |n: &serde_json::Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => {
            let (x, y) = (a.as_f64()?, b.as_f64()?);
            match x.partial_cmp(&y)? {
                Ordering::Equal => {
                    // Same double: an integer may still differ from it by less than one ULP.
                    let exact = |n: &serde_json::Number, f: f64| -> Option<Ordering> {
                        let i = int(n)?;
                        // f is whole here (it equals an integer's rounding) and below 2^65.
                        Some(i.cmp(&(f as i128)))
                    };
                    match (exact(a, x), exact(b, y)) {
                        (Some(o), None) => Some(o),
                        (None, Some(o)) => Some(o.reverse()),
                        _ => Some(Ordering::Equal),
                    }
                }
                o => Some(o),
            }
        }
    }
}

fn reference_compare(op: CompareOp, a: Ref<'_>, b: Ref<'_>) -> bool {
    let (a, b) = match (a, b) {
        (Ref::Missing, _) | (_, Ref::Missing) => return false,
        (Ref::Str(x), Ref::Str(y)) => return ordered(op, Some(x.as_bytes().cmp(y.as_bytes()))),
        (Ref::Str(x), Ref::Json(y)) => (Value::from(x), y.clone()),
        (Ref::Json(x), Ref::Str(y)) => (x.clone(), Value::from(y)),
        (Ref::Json(x), Ref::Json(y)) => (x.clone(), y.clone()),
    };
    match (&a, &b) {
        (Value::Null, Value::Null) => op == CompareOp::Eq,
        (Value::Null, _) | (_, Value::Null) => op == CompareOp::Ne,
        (Value::String(x), Value::String(y)) => ordered(op, Some(x.as_bytes().cmp(y.as_bytes()))),
        (Value::Number(x), Value::Number(y)) => ordered(op, number_order(x, y)),
        (Value::Bool(x), Value::Bool(y)) => match op {
            CompareOp::Eq => x == y,
            CompareOp::Ne => x != y,
            _ => false,
        },
        _ => false,
    }
}

fn ordered(op: CompareOp, ord: Option<Ordering>) -> bool {
    let Some(ord) = ord else { return false };
    match op {
        CompareOp::Eq => ord.is_eq(),
        CompareOp::Ne => ord.is_ne(),
        CompareOp::Lt => ord.is_lt(),
        CompareOp::Le => ord.is_le(),
        CompareOp::Gt => ord.is_gt(),
        CompareOp::Ge => ord.is_ge(),
    }
}

fn reference(expr: &Expr, event: &CloudEvent) -> bool {
    match expr {
        Expr::Const(b) => *b,
        Expr::And(items) => items.iter().all(|e| reference(e, event)),
        Expr::Or(items) => items.iter().any(|e| reference(e, event)),
        Expr::Not(inner) => !reference(inner, event),
        Expr::Compare { op, left, right } => {
            let (lj, rj);
            let a = match left {
                Operand::Literal(l) => {
                    lj = literal_json(l);
                    Ref::Json(&lj)
                }
                f => reference_value(f, event),
            };
            let b = match right {
                Operand::Literal(l) => {
                    rj = literal_json(l);
                    Ref::Json(&rj)
                }
                f => reference_value(f, event),
            };
            reference_compare(*op, a, b)
        }
        Expr::Call { func, left, right } => {
            let string = |o: &Operand| -> Option<String> {
                match o {
                    Operand::Literal(Literal::String(s)) => Some(s.clone()),
                    Operand::Literal(_) => None,
                    f => match reference_value(f, event) {
                        Ref::Str(s) => Some(s.to_owned()),
                        Ref::Json(Value::String(s)) => Some(s.clone()),
                        _ => None,
                    },
                }
            };
            match (string(left), string(right)) {
                (Some(x), Some(y)) => match func {
                    Function::StartsWith => x.starts_with(&y),
                    Function::EndsWith => x.ends_with(&y),
                    Function::Contains => x.contains(&y),
                },
                _ => false,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

fn check_evaluation(filter: &Filter, event: &CloudEvent) -> Result<(), TestCaseError> {
    let matched = filter.matches(event);
    let explained = filter.explain(event);
    prop_assert_eq!(explained.matched, matched, "explain disagrees:\n{}", explained);
    let _ = explained.to_string();
    prop_assert_eq!(
        reference(filter.expr(), event),
        matched,
        "reference evaluator disagrees on `{}` with body {:?}",
        filter,
        event.data().map(|d| String::from_utf8_lossy(&d.bytes).into_owned())
    );
    // A fresh copy reads the body anew and must give the same result; so must a copy whose
    // body was parsed already (filters then read the parsed value instead of the bytes).
    prop_assert_eq!(filter.matches(&event.clone()), matched);
    let parsed = event.clone();
    let _ = parsed.body();
    prop_assert_eq!(filter.matches(&parsed), matched, "with the body parsed first");
    // In a route table the filter is compiled differently (attribute dictionaries, a guard).
    let table = RouteTable::new(vec![Route { id: "r".into(), endpoint: "e".into(), filter: filter.clone() }]);
    prop_assert_eq!(!table.route(&event.clone()).is_empty(), matched, "in a table");
    if let Some(b) = filter.constant() {
        prop_assert_eq!(b, matched);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// (1) Printing then parsing gives the same tree.
    #[test]
    fn canonical_text_round_trips(expr in expr()) {
        let text = expr.to_string();
        prop_assume!(text.len() <= MAX_FILTER_LEN);
        let parsed = Filter::parse(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{expr:?}")))?;
        prop_assert_eq!(parsed.expr(), &expr, "text: {}", text);
        prop_assert_eq!(parsed.to_string(), text);
    }

    /// (2) Evaluation never panics and agrees with explain and the reference, on generated bodies.
    #[test]
    fn evaluation_agrees_on_generated_bodies(
        expr in expr(),
        body in json(),
        subject in prop::option::of(prop::sample::select(vec!["a", "ab", "A"])),
    ) {
        let filter = Filter::from_expr(expr);
        check_evaluation(&filter, &json_event(&body, subject))?;
    }

    /// (2) ... and on odd events: no body, text and binary data, scalar and array bodies, duplicates.
    #[test]
    fn evaluation_agrees_on_odd_events(expr in expr()) {
        let filter = Filter::from_expr(expr);
        for event in odd_events() {
            check_evaluation(&filter, &event)?;
        }
    }

    /// (4) A table routes to the endpoints whose routes match one by one, each once.
    #[test]
    fn tables_agree_with_their_filters(
        routes in prop::collection::vec((expr(), 0usize..4), 0..8),
        body in json(),
        subject in prop::option::of(prop::sample::select(vec!["a", "ab", "A"])),
    ) {
        let routes: Vec<Route> = routes
            .into_iter()
            .enumerate()
            .map(|(i, (expr, endpoint))| Route {
                id: format!("r{i}"),
                endpoint: format!("e{endpoint}"),
                filter: Filter::from_expr(expr),
            })
            .collect();
        let table = RouteTable::new(routes.clone());
        let mut events = odd_events();
        events.push(json_event(&body, subject));
        for event in &events {
            let routed: Vec<&str> =
                table.route(&event.clone()).iter().map(|i| table.endpoints()[i].as_str()).collect();
            let mut expected: Vec<&str> = Vec::new();
            for endpoint in table.endpoints() {
                if routes.iter().any(|r| r.endpoint == *endpoint && r.filter.matches(event)) {
                    expected.push(endpoint);
                }
            }
            prop_assert_eq!(routed, expected);
        }
    }

    /// (3) Parsing any string never panics; errors point inside the text; successes round-trip.
    #[test]
    fn parsing_arbitrary_text_never_panics(text in ".{0,64}") {
        check_parse(&text)?;
    }

    /// (3) ... and text made of the language's own tokens, which gets much further in the parser.
    #[test]
    fn parsing_token_soup_never_panics(parts in prop::collection::vec(prop::sample::select(vec![
        "(", ")", "AND", "or", "NOT", "'", "''", "'x'", "$body", "$body.a", ".", "a", "=", "!=", "<",
        "<=", ">", ">=", ",", "STARTS_WITH", "contains", "true", "FALSE", "null", "-", "1", "1.5",
        "e5", "9223372036854775808", " ", "type", "subject", "Type", "\n", "é", "\"", "==",
    ]), 0..24)) {
        check_parse(&parts.concat())?;
        check_parse(&parts.join(" "))?;
    }
}

fn check_parse(text: &str) -> Result<(), TestCaseError> {
    match Filter::parse(text) {
        Ok(filter) => {
            let canonical = filter.to_string();
            let again = Filter::parse(&canonical)
                .map_err(|e| TestCaseError::fail(format!("canonical text of {text:?} fails: {e}")))?;
            prop_assert_eq!(again.expr(), filter.expr());
            for event in odd_events().iter().take(3) {
                let _ = filter.matches(event);
            }
        }
        Err(e) => {
            prop_assert!(e.offset <= text.len(), "offset {} beyond {:?}", e.offset, text);
            prop_assert!(text.is_char_boundary(e.offset));
            let shown = e.to_string();
            prop_assert!(shown.starts_with("expected "));
            let at = format!("at offset {}", e.offset);
            prop_assert!(shown.contains(&at), "{}", shown);
        }
    }
    Ok(())
}

#[test]
fn deep_hostile_input_is_an_error_not_a_stack_overflow() {
    for text in [
        "(".repeat(MAX_FILTER_LEN),
        "NOT ".repeat(MAX_FILTER_LEN / 4),
        format!("{}true{}", "(".repeat(2000), ")".repeat(2000)),
    ] {
        assert!(Filter::parse(&text).is_err());
    }
}
