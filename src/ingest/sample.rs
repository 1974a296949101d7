//! The sample source: a small twin population changing over time, emitting the events ADT
//! would: twins created, their properties patched, telemetry, relationships, deletions. It
//! feeds the local demo so a newcomer sees events flow with no producer of their own.

use crate::delivery::{Dispatcher, Refusal};
use crate::event::{parse_structured, CloudEvent};
use std::time::Duration;

/// The instance host name the samples claim to come from.
const SAMPLE_HOST: &str = "twinroute-sample.api.local.digitaltwins.azure.net";
const ROOM_MODEL: &str = "dtmi:com:example:Room;1";
const FLOOR_MODEL: &str = "dtmi:com:example:Floor;1";

/// Generates a reproducible stream of ADT events for `twins` rooms on one floor.
pub struct SampleGenerator {
    rng: fastrand::Rng,
    twins: usize,
    /// Which rooms currently exist (created and not deleted).
    alive: Vec<bool>,
    temperature: Vec<f64>,
    started: bool,
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn trace_id(rng: &mut fastrand::Rng) -> String {
    format!("00-{:032x}-{:016x}-01", rng.u128(1..), rng.u64(1..))
}

impl SampleGenerator {
    pub fn new(twins: usize, seed: u64) -> Self {
        let twins = twins.max(1);
        Self {
            rng: fastrand::Rng::with_seed(seed),
            twins,
            alive: vec![false; twins],
            temperature: vec![21.0; twins],
            started: false,
        }
    }

    fn notification(&mut self, ty: &str, subject: &str, data: serde_json::Value) -> CloudEvent {
        let json = serde_json::json!({
            "specversion": "1.0",
            "id": uuid::Uuid::from_u128(self.rng.u128(..)).to_string(),
            "type": ty,
            "source": SAMPLE_HOST,
            "subject": subject,
            "time": now_rfc3339(),
            "datacontenttype": "application/json",
            "traceparent": trace_id(&mut self.rng),
            "data": data,
        });
        parse_structured(json.to_string().as_bytes()).expect("generated sample events are valid")
    }

    fn create(&mut self, i: usize) -> CloudEvent {
        self.alive[i] = true;
        self.temperature[i] = 19.0 + self.rng.f64() * 4.0;
        let id = format!("room-{i}");
        let data = serde_json::json!({
            "$dtId": id,
            "$etag": format!("W/\"{}\"", uuid::Uuid::from_u128(self.rng.u128(..))),
            "temperature": self.temperature[i],
            "occupied": false,
            "$metadata": {"$model": ROOM_MODEL, "temperature": {"lastUpdateTime": now_rfc3339()}},
        });
        self.notification("Microsoft.DigitalTwins.Twin.Create", &id, data)
    }

    /// The next event of the stream.
    pub fn next_event(&mut self) -> CloudEvent {
        if !self.started {
            // The floor first, so relationships have a source.
            self.started = true;
            let data = serde_json::json!({"$dtId": "floor-1", "$etag": "W/\"1\"", "$metadata": {"$model": FLOOR_MODEL}});
            return self.notification("Microsoft.DigitalTwins.Twin.Create", "floor-1", data);
        }
        let i = self.rng.usize(..self.twins);
        if !self.alive[i] {
            return self.create(i);
        }
        let id = format!("room-{i}");
        match self.rng.u32(..100) {
            0..=44 => {
                // Telemetry drifts the room's temperature; some rooms run hot.
                self.temperature[i] += self.rng.f64() * 3.0 - 1.3;
                let body = serde_json::json!({"temperature": (self.temperature[i] * 10.0).round() / 10.0, "humidity": 40 + self.rng.u32(..20)});
                let json = serde_json::json!({
                    "specversion": "1.0",
                    "id": uuid::Uuid::from_u128(self.rng.u128(..)).to_string(),
                    "type": "microsoft.iot.telemetry",
                    "source": format!("{SAMPLE_HOST}/digitaltwins/{id}"),
                    "datacontenttype": "application/json",
                    "dataschema": ROOM_MODEL,
                    "traceparent": trace_id(&mut self.rng),
                    "data": body,
                });
                parse_structured(json.to_string().as_bytes()).expect("generated sample events are valid")
            }
            45..=84 => {
                let occupied = self.rng.bool();
                let patch = serde_json::json!({"modelId": ROOM_MODEL, "patch": [
                    {"value": (self.temperature[i] * 10.0).round() / 10.0, "path": "/temperature", "op": "replace"},
                    {"value": occupied, "path": "/occupied", "op": "replace"},
                ]});
                self.notification("Microsoft.DigitalTwins.Twin.Update", &id, patch)
            }
            85..=94 => {
                let rel = format!("floor-1-contains-{id}");
                let data = serde_json::json!({
                    "$relationshipId": rel, "$etag": "W/\"1\"", "$sourceId": "floor-1",
                    "$relationshipName": "contains", "$targetId": id,
                });
                self.notification(
                    "Microsoft.DigitalTwins.Relationship.Create",
                    &format!("floor-1/relationships/{rel}"),
                    data,
                )
            }
            _ => {
                self.alive[i] = false;
                let data = serde_json::json!({"$dtId": id, "$etag": "W/\"2\"", "temperature": self.temperature[i], "$metadata": {"$model": ROOM_MODEL}});
                self.notification("Microsoft.DigitalTwins.Twin.Delete", &id, data)
            }
        }
    }
}

/// Emits `events_per_second` sample events until `limit` (if any) or shutdown.
pub async fn run(dispatcher: &Dispatcher, events_per_second: f64, twins: usize, limit: Option<u64>) {
    let mut generator = SampleGenerator::new(twins, fastrand::u64(..));
    let period = Duration::from_secs_f64(1.0 / events_per_second.clamp(0.001, 100_000.0));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    while limit.is_none_or(|l| sent < l) {
        ticker.tick().await;
        let event = generator.next_event();
        match dispatcher.submit(vec![event], "sample").await {
            Ok(_) => sent += 1,
            // A full queue just skips a sample: it is made up anyway, and counted as rejected.
            Err(Refusal::Full { .. } | Refusal::Bytes { .. } | Refusal::SpoolFull { .. }) => {}
            Err(Refusal::ShuttingDown | Refusal::Storage(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    #[test]
    fn streams_are_valid_and_varied() {
        let mut g = SampleGenerator::new(3, 7);
        let kinds: std::collections::HashSet<_> = (0..500).map(|_| g.next_event().kind()).collect();
        for k in [
            EventKind::TwinCreate,
            EventKind::TwinUpdate,
            EventKind::TwinDelete,
            EventKind::RelationshipCreate,
            EventKind::Telemetry,
        ] {
            assert!(kinds.contains(&k), "{k:?} never generated");
        }
    }
}
