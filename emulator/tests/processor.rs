//! The AMQP stand-in against the official `EventProcessor` of `azure_messaging_eventhubs` 0.15,
//! the way twinroute's `eventhubs` source uses it: two processors of one consumer group share a
//! hub's partitions (ownership in a checkpoint store kept here in memory), read them from the
//! selectors the processor builds, open every receiver with owner level 0, checkpoint, and when
//! one processor stops, the other takes its partitions over: its epoch-0 receivers displace the
//! stopped one's, and it starts after the checkpoints.

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::Etag;
use azure_core::time::OffsetDateTime;
use azure_messaging_eventhubs::models::{Checkpoint, EventData, Ownership, StartPositions};
use azure_messaging_eventhubs::{
    CheckpointStore, ConsumerClient, EventProcessor, ProducerClient, SendEventOptions, StartLocation,
    StartPosition,
};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use twinroute_emulator::amqp::{AmqpConfig, AmqpStandIn, HubDef, NamespaceDef, DEFAULT_NAMESPACE};
use twinroute_emulator::jwt::{self, Claims};
use twinroute_emulator::DEV_SIGNING_KEY;

const HUB: &str = "shared";
const PARTITIONS: u32 = 4;

#[derive(Debug)]
struct DevCredential;

#[async_trait]
impl TokenCredential for DevCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = Claims {
            aud: "https://eventhubs.azure.net/".into(),
            iss: "https://sts.windows.net/00000000-0000-4000-8000-00000000a000/".into(),
            iat: now - 120,
            nbf: now - 120,
            exp: now + 3600,
            appid: "00000000-0000-4000-8000-00000000c001".into(),
            oid: "00000000-0000-4000-8000-00000000b001".into(),
            sub: "00000000-0000-4000-8000-00000000b001".into(),
            tid: "00000000-0000-4000-8000-00000000a000".into(),
            xms_mirid: None,
        };
        let token = jwt::issue(&claims, DEV_SIGNING_KEY);
        Ok(AccessToken::new(token, OffsetDateTime::from_unix_timestamp(now + 3600).unwrap()))
    }
}

/// Ownerships and checkpoints with the etag rule of the Blob store (a claim with a stale etag fails).
#[derive(Default)]
struct MemoryStore {
    ownerships: Mutex<BTreeMap<String, Ownership>>,
    checkpoints: Mutex<BTreeMap<String, Checkpoint>>,
    next_etag: Mutex<u64>,
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    async fn claim_ownership(&self, ownerships: &[Ownership]) -> azure_core::Result<Vec<Ownership>> {
        let mut stored = self.ownerships.lock().unwrap();
        let mut claimed = Vec::new();
        for o in ownerships {
            let current = stored.get(&o.partition_id);
            if current.is_some_and(|c| c.etag != o.etag) {
                continue;
            }
            let mut next = self.next_etag.lock().unwrap();
            *next += 1;
            let mut o = o.clone();
            o.etag = Some(Etag::from(next.to_string()));
            o.last_modified_time = Some(OffsetDateTime::now_utc());
            stored.insert(o.partition_id.clone(), o.clone());
            claimed.push(o);
        }
        Ok(claimed)
    }

    async fn list_checkpoints(&self, _: &str, _: &str, _: &str) -> azure_core::Result<Vec<Checkpoint>> {
        Ok(self.checkpoints.lock().unwrap().values().cloned().collect())
    }

    async fn list_ownerships(&self, _: &str, _: &str, _: &str) -> azure_core::Result<Vec<Ownership>> {
        Ok(self.ownerships.lock().unwrap().values().cloned().collect())
    }

    async fn update_checkpoint(&self, checkpoint: Checkpoint) -> azure_core::Result<()> {
        self.checkpoints.lock().unwrap().insert(checkpoint.partition_id.clone(), checkpoint);
        Ok(())
    }
}

/// (processor, partition, event index) of every event read.
type Seen = Arc<Mutex<Vec<(usize, String, usize)>>>;

/// Starts processor `who` on the local set: its load-balancing loop and a reader per partition
/// it is handed, checkpointing every event.
async fn processor(standin: &AmqpStandIn, store: Arc<MemoryStore>, who: usize, seen: Seen) -> Processor {
    let consumer = ConsumerClient::builder()
        .with_custom_endpoint(standin.endpoint())
        .open(DEFAULT_NAMESPACE, HUB.to_owned(), Arc::new(DevCredential))
        .await
        .expect("the consumer connects");
    let processor = EventProcessor::builder()
        .with_update_interval(azure_core::time::Duration::milliseconds(200))
        .with_partition_expiration_duration(azure_core::time::Duration::milliseconds(1500))
        .with_start_positions(StartPositions {
            per_partition: HashMap::new(),
            default: StartPosition { location: StartLocation::Earliest, inclusive: false },
        })
        .build(consumer, store)
        .await
        .expect("the processor builds");
    let runner = {
        let processor = processor.clone();
        tokio::task::spawn_local(async move {
            let _ = processor.run().await;
        })
    };
    let readers: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
    let handles = readers.clone();
    let dispatcher = tokio::task::spawn_local(async move {
        while let Ok(client) = processor.next_partition_client().await {
            let seen = seen.clone();
            let reader = tokio::task::spawn_local(async move {
                let partition = client.get_partition_id().to_owned();
                let mut stream = client.stream_events();
                while let Some(Ok(event)) = stream.next().await {
                    let body =
                        String::from_utf8_lossy(event.event_data().body().unwrap_or_default()).into_owned();
                    seen.lock().unwrap().push((who, partition.clone(), body.parse().unwrap()));
                    client.update_checkpoint(&event).await.expect("checkpoint");
                }
            });
            handles.lock().unwrap().push(reader.abort_handle());
        }
    });
    Processor { tasks: vec![runner.abort_handle(), dispatcher.abort_handle()], readers }
}

/// A started processor's tasks, to stop it the way a killed process stops: all at once.
struct Processor {
    tasks: Vec<tokio::task::AbortHandle>,
    readers: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Processor {
    fn kill(&self) {
        for task in self.tasks.iter().chain(self.readers.lock().unwrap().iter()) {
            task.abort();
        }
    }
}

async fn publish(producer: &ProducerClient, range: std::ops::Range<usize>) {
    for i in range {
        let options = SendEventOptions { partition_id: Some((i % PARTITIONS as usize).to_string()) };
        producer
            .send_event(EventData::builder().with_body(i.to_string().into_bytes()).build(), Some(options))
            .await
            .unwrap();
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_processors_share_a_hub_and_one_takes_over() {
    let namespace = NamespaceDef {
        hubs: vec![HubDef { name: HUB.into(), partition_count: PARTITIONS }],
        ..NamespaceDef::default()
    };
    let standin =
        AmqpStandIn::start(AmqpConfig { namespaces: vec![namespace], ..Default::default() }).await.unwrap();
    let producer = ProducerClient::builder()
        .with_custom_endpoint(standin.endpoint())
        .open(DEFAULT_NAMESPACE, HUB, Arc::new(DevCredential))
        .await
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let store = Arc::new(MemoryStore::default());
            let seen: Seen = Default::default();
            publish(&producer, 0..40).await;
            let first = processor(&standin, store.clone(), 0, seen.clone()).await;
            let _second = processor(&standin, store.clone(), 1, seen.clone()).await;
            let owners = || {
                let seen = seen.lock().unwrap();
                let mut by = [0usize; 2];
                for (who, _, _) in seen.iter() {
                    by[*who] += 1;
                }
                (seen.iter().map(|s| s.2).collect::<std::collections::BTreeSet<_>>(), by)
            };
            until("both processors read and every event is read", || {
                let (read, by) = owners();
                read.len() == 40 && by.iter().all(|&n| n > 0)
            })
            .await;
            let ownerships = store.ownerships.lock().unwrap().len();
            assert_eq!(ownerships, PARTITIONS as usize, "every partition was claimed");

            // The first processor stops without a word (its receivers stay attached): the second
            // one claims the expired ownerships and its epoch-0 receivers displace the old ones.
            first.kill();
            tokio::task::yield_now().await;
            let before = seen.lock().unwrap().len();
            publish(&producer, 40..80).await;
            until("the second processor reads every partition", || {
                let seen = seen.lock().unwrap();
                let by_second: std::collections::BTreeSet<_> =
                    seen[before..].iter().filter(|s| s.0 == 1).map(|s| s.2).collect();
                (40..80).all(|i| by_second.contains(&i))
            })
            .await;
            let checkpoints = store.checkpoints.lock().unwrap();
            assert_eq!(checkpoints.len(), PARTITIONS as usize);
            for c in checkpoints.values() {
                assert!(c.sequence_number.is_some() && c.offset.is_some(), "{c:?}");
            }
        })
        .await;
}
