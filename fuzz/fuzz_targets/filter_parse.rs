//! Any text through `Filter::parse`: never panics, errors point inside the text, and a filter
//! that parses prints to canonical text that parses back to the same tree, and evaluates the
//! same way on a fixed set of events (with and without its body parsed first), as does its
//! explanation and a one-route table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use twinroute::event::{parse_structured, CloudEvent};
use twinroute::filter::{Filter, MAX_FILTER_LEN};
use twinroute::routing::{Route, RouteTable};

fn events() -> &'static [CloudEvent] {
    static EVENTS: OnceLock<Vec<CloudEvent>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        [
            &br#"{"specversion":"1.0","id":"1","source":"adt.example","type":"Microsoft.DigitalTwins.Twin.Create","subject":"t-1","datacontenttype":"application/json","data":{"$dtId":"t-1","temperature":21.5,"on":true,"n":null,"big":18446744073709551615,"$metadata":{"$model":"dtmi:example:com:floor;1"},"a":{"b":{"c":"d\u00e9"}},"list":[1,{"a":2}]}}"#[..],
            br#"{"specversion":"1.0","id":"2","source":"adt.example/digitaltwins/t-2","type":"microsoft.iot.telemetry","dataschema":"dtmi:x;1","data":[1,2,3]}"#,
            br#"{"specversion":"1.0","id":"3","source":"s","type":"t","datacontenttype":"text/plain","data":"plain text"}"#,
            br#"{"specversion":"1.0","id":"4","source":"s","type":"t"}"#,
        ]
        .iter()
        .map(|json| parse_structured(json).expect("fixed events are valid"))
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Filter::parse(text) {
        Err(error) => {
            assert!(error.offset <= text.len());
            assert!(text.is_char_boundary(error.offset));
            let _ = error.to_string();
        }
        Ok(filter) => {
            let canonical = filter.to_string();
            // Canonical spacing and number forms can make a text near the length limit longer
            // than the limit (`a=1e9` is `a = 1000000000.0`); nesting never grows.
            if canonical.len() <= MAX_FILTER_LEN {
                let again = Filter::parse(&canonical).expect("canonical text parses");
                assert_eq!(again.expr(), filter.expr(), "canonical text {canonical:?} of {text:?}");
            }
            let table =
                RouteTable::new(vec![Route { id: "r".into(), endpoint: "e".into(), filter: filter.clone() }]);
            for event in events() {
                let matched = filter.matches(event);
                assert_eq!(filter.matches(&event.clone()), matched);
                let parsed = event.clone();
                let _ = parsed.body();
                assert_eq!(filter.matches(&parsed), matched);
                assert_eq!(filter.explain(event).matched, matched);
                assert_eq!(!table.route(event).is_empty(), matched);
                if let Some(constant) = filter.constant() {
                    assert_eq!(constant, matched);
                }
            }
        }
    }
});
