//! Any bytes through the structured and batch event parsers: never panics; an event that parses
//! re-encodes to JSON that parses to an equal event, and filters reading `$body` from its bytes
//! see what they see in the parsed body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use twinroute::event::{parse_batch, parse_structured, CloudEvent};
use twinroute::filter::Filter;

fn filters() -> &'static [Filter] {
    static FILTERS: OnceLock<Vec<Filter>> = OnceLock::new();
    FILTERS.get_or_init(|| {
        [
            "$body != null",
            "$body.a = 1",
            "$body.a != 'x'",
            "$body.a.b >= 0.5",
            "STARTS_WITH($body.$metadata.$model, 'dtmi:')",
            "$body.a = $body.b",
            "CONTAINS(subject, 'a') OR type = 't'",
        ]
        .iter()
        .map(|text| Filter::parse(text).expect("fixed filters parse"))
        .collect()
    })
}

fn check(event: &CloudEvent) {
    let encoded = event.to_structured_json();
    let again = parse_structured(&encoded).expect("an encoded event parses");
    assert_eq!(&again, event);
    for filter in filters() {
        // From the bytes, then from the parsed body.
        let scanned = filter.matches(event);
        let parsed = event.clone();
        let _ = parsed.body();
        assert_eq!(filter.matches(&parsed), scanned, "{filter}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = parse_structured(data) {
        check(&event);
    }
    if let Ok(events) = parse_batch(data) {
        for event in &events {
            check(event);
        }
    }
});
