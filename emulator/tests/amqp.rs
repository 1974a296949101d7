//! The AMQP stand-in against the OFFICIAL Azure clients, over loopback:
//! `azure_messaging_eventhubs` 0.15 (producer, consumer) and `azure_core_amqp` 1.1 (connection,
//! session, CBS, sender, receiver), both through their custom-endpoint option.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::Url;
use azure_core::time::OffsetDateTime;
use azure_core_amqp::error::{AmqpDescribedError, AmqpErrorCondition, AmqpErrorKind};
use azure_core_amqp::message::{AmqpAnnotationKey, AmqpMessageBody, AmqpMessageId, AmqpMessageProperties};
use azure_core_amqp::{
    AmqpClaimsBasedSecurity, AmqpClaimsBasedSecurityApis, AmqpConnection, AmqpConnectionApis,
    AmqpConnectionOptions, AmqpDeliveryApis, AmqpError, AmqpMessage, AmqpReceiver, AmqpReceiverApis,
    AmqpReceiverOptions, AmqpSendOptions, AmqpSendOutcome, AmqpSender, AmqpSenderApis, AmqpSession,
    AmqpSessionApis, AmqpSimpleValue, AmqpSource, AmqpSymbol, AmqpValue, ReceiverCreditMode,
};
use azure_messaging_eventhubs::error::ErrorKind;
use azure_messaging_eventhubs::models::{EventData, MessageId, ReceivedEventData};
use azure_messaging_eventhubs::{
    ConsumerClient, EventDataBatchOptions, EventReceiver, OpenReceiverOptions, ProducerClient, RetryOptions,
    StartLocation, StartPosition,
};
use base64::Engine as _;
use futures::StreamExt;
use hmac::Mac;
use twinroute_emulator::amqp::{
    AmqpConfig, AmqpFault, AmqpStandIn, AmqpStats, HubDef, NamespaceDef, BATCH_MESSAGE_FORMAT,
    DEFAULT_NAMESPACE, DEV_SAS_KEY, DEV_SAS_KEY_NAME, TOKEN_TYPE_SAS,
};
use twinroute_emulator::jwt::{self, Claims};
use twinroute_emulator::DEV_SIGNING_KEY;

const NS: &str = DEFAULT_NAMESPACE;
const EVENT_HUBS: &str = "https://eventhubs.azure.net/";
const SERVICE_BUS: &str = "https://servicebus.azure.net";
const OID: &str = "00000000-0000-4000-8000-00000000b001";

/// Logs to the test output when `RUST_LOG` is set.
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Every wait in these tests is bounded: a protocol mistake fails instead of hanging.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An error with all its sources: the SDKs wrap the service's description a few levels deep.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = format!("{error:?}");
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(&format!(" <- {inner}"));
        source = inner.source();
    }
    text
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn jwt_token(aud: &str, oid: &str, key: &[u8], lifetime_secs: i64) -> (String, OffsetDateTime) {
    let now = now();
    let claims = Claims {
        aud: aud.into(),
        iss: "https://sts.windows.net/00000000-0000-4000-8000-00000000a000/".into(),
        iat: now - 120,
        nbf: now - 120,
        exp: now + lifetime_secs,
        appid: "00000000-0000-4000-8000-00000000c001".into(),
        oid: oid.into(),
        sub: oid.into(),
        tid: "00000000-0000-4000-8000-00000000a000".into(),
        xms_mirid: None,
    };
    (jwt::issue(&claims, key), OffsetDateTime::from_unix_timestamp(now + lifetime_secs).unwrap())
}

/// A `TokenCredential` handing out one fixed token, as the daemon's IMDS credential would.
#[derive(Debug)]
struct FixedCredential(AccessToken);

#[async_trait::async_trait]
impl TokenCredential for FixedCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(self.0.clone())
    }
}

fn credential(aud: &str, oid: &str, key: &[u8], lifetime_secs: i64) -> Arc<dyn TokenCredential> {
    let (token, expires_on) = jwt_token(aud, oid, key, lifetime_secs);
    Arc::new(FixedCredential(AccessToken::new(token, expires_on)))
}

fn good_credential() -> Arc<dyn TokenCredential> {
    credential(EVENT_HUBS, OID, DEV_SIGNING_KEY, 3600)
}

/// Failing operations are not retried for a minute.
fn quick_retries() -> RetryOptions {
    RetryOptions {
        initial_delay: azure_core::time::Duration::milliseconds(10),
        max_delay: azure_core::time::Duration::milliseconds(50),
        max_total_elapsed: azure_core::time::Duration::seconds(2),
        max_retries: 1,
    }
}

async fn producer(standin: &AmqpStandIn, hub: &str, credential: Arc<dyn TokenCredential>) -> ProducerClient {
    within(
        "producer open",
        ProducerClient::builder()
            .with_custom_endpoint(standin.endpoint())
            .with_retry_options(quick_retries())
            .open(NS, hub, credential),
    )
    .await
    .expect("the producer connects")
}

async fn consumer(standin: &AmqpStandIn, hub: &str) -> ConsumerClient {
    within(
        "consumer open",
        ConsumerClient::builder()
            .with_custom_endpoint(standin.endpoint())
            .with_retry_options(quick_retries())
            .open(NS, hub.to_owned(), good_credential()),
    )
    .await
    .expect("the consumer connects")
}

fn event(i: usize, twin: &str) -> EventData {
    EventData::builder()
        .with_body(format!("{{\"twin\":\"{twin}\",\"seq\":{i}}}").into_bytes())
        .with_content_type("application/json".into())
        .with_message_id(format!("{twin}-evt-{i}"))
        .add_property("cloudEvents:type".into(), "Microsoft.DigitalTwins.Twin.Update")
        .add_property("cloudEvents:id".into(), format!("{twin}-{i}"))
        .add_property("index".into(), i as i32)
        .build()
}

async fn read_events(receiver: &EventReceiver, count: usize) -> Vec<ReceivedEventData> {
    let mut stream = receiver.stream_events();
    let mut events = Vec::new();
    while events.len() < count {
        let next = within("an event", stream.next()).await.expect("the stream goes on");
        events.push(next.expect("an event, not an error"));
    }
    events
}

fn from_earliest() -> Option<OpenReceiverOptions> {
    Some(OpenReceiverOptions {
        start_position: Some(StartPosition { location: StartLocation::Earliest, inclusive: false }),
        ..Default::default()
    })
}

fn string_property(event: &EventData, name: &str) -> Option<String> {
    match event.properties()?.get(name)? {
        AmqpSimpleValue::String(s) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn event_hubs_producer_and_consumer_round_trip() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let producer = producer(&standin, "twins", good_credential()).await;

    let properties = within("eventhub properties", producer.get_eventhub_properties()).await.unwrap();
    assert_eq!(properties.name, "twins");
    assert_eq!(properties.partition_ids, ["0", "1", "2", "3"]);
    assert!(properties.created_on.is_some());
    let empty = within("partition properties", producer.get_partition_properties("3")).await.unwrap();
    assert!(empty.is_empty);
    assert_eq!((empty.id.as_str(), empty.eventhub.as_str()), ("3", "twins"));
    assert_eq!((empty.beginning_sequence_number, empty.last_enqueued_sequence_number), (0, -1));
    assert_eq!(empty.last_enqueued_time_utc, None);

    // Three events with a partition key in one batch, then one more with the same key.
    let keyed =
        || Some(EventDataBatchOptions { partition_key: Some("twin-42".into()), ..Default::default() });
    let batch = within("create batch", producer.create_batch(keyed())).await.unwrap();
    for i in 0..3 {
        assert!(batch.try_add_event_data(event(i, "twin-42"), None).unwrap());
    }
    within("send batch", producer.send_batch(batch, None)).await.unwrap();
    let batch = within("create batch", producer.create_batch(keyed())).await.unwrap();
    assert!(batch.try_add_event_data(event(3, "twin-42"), None).unwrap());
    within("send batch", producer.send_batch(batch, None)).await.unwrap();

    // Two events to an explicit partition.
    let to_one = Some(EventDataBatchOptions { partition_id: Some("1".into()), ..Default::default() });
    let batch = within("create batch", producer.create_batch(to_one)).await.unwrap();
    for i in 0..2 {
        assert!(batch.try_add_event_data(event(i, "twin-p1"), None).unwrap());
    }
    within("send batch", producer.send_batch(batch, None)).await.unwrap();

    // Same key, same partition: all four keyed events sit together, in order.
    let keyed_partition: Vec<String> = (0..4)
        .map(|_| {
            let all = standin.stored(NS, "twins");
            let of_key: BTreeSet<String> = all
                .iter()
                .filter(|m| m.message_id().is_some_and(|id| id.starts_with("twin-42")))
                .map(|m| m.partition_id.clone().unwrap())
                .collect();
            assert_eq!(of_key.len(), 1, "one partition for one key: {of_key:?}");
            of_key.into_iter().next().unwrap()
        })
        .collect();
    let key_partition = keyed_partition[0].clone();
    let stored = standin.stored(NS, &format!("twins/Partitions/{key_partition}"));
    let keyed: Vec<_> =
        stored.iter().filter(|m| m.message_id().is_some_and(|id| id.starts_with("twin-42"))).collect();
    assert_eq!(keyed.len(), 4, "a batch of 3 is 3 messages, plus 1");
    assert_eq!(
        keyed.iter().map(|m| m.message_id().unwrap()).collect::<Vec<_>>(),
        ["twin-42-evt-0", "twin-42-evt-1", "twin-42-evt-2", "twin-42-evt-3"]
    );
    let p1 = standin.stored(NS, "twins/Partitions/1");
    assert_eq!(p1.iter().filter(|m| m.message_id().is_some_and(|id| id.starts_with("twin-p1"))).count(), 2);

    let properties =
        within("partition properties", producer.get_partition_properties(&key_partition)).await.unwrap();
    assert!(!properties.is_empty);
    assert_eq!(properties.last_enqueued_sequence_number, stored.len() as i64 - 1);
    assert_eq!(properties.last_enqueued_offset, stored.last().unwrap().offset.clone().unwrap());
    assert!(properties.last_enqueued_time_utc.is_some());

    // The consumer reads exactly those events back, from the start of the partition.
    let consumer = consumer(&standin, "twins").await;
    let receiver =
        within("open receiver", consumer.open_receiver_on_partition(key_partition.clone(), from_earliest()))
            .await
            .unwrap();
    let events = read_events(&receiver, stored.len()).await;
    let keyed: Vec<&ReceivedEventData> = events
        .iter()
        .filter(|e| matches!(e.event_data().message_id(), Some(MessageId::String(id)) if id.starts_with("twin-42")))
        .collect();
    assert_eq!(keyed.len(), 4);
    for (i, received) in keyed.iter().enumerate() {
        let data = received.event_data();
        assert_eq!(data.body().unwrap(), format!("{{\"twin\":\"twin-42\",\"seq\":{i}}}").as_bytes());
        assert_eq!(data.content_type(), Some("application/json"));
        assert_eq!(data.message_id(), Some(&MessageId::String(format!("twin-42-evt-{i}"))));
        assert_eq!(
            string_property(data, "cloudEvents:type").as_deref(),
            Some("Microsoft.DigitalTwins.Twin.Update")
        );
        assert_eq!(string_property(data, "cloudEvents:id"), Some(format!("twin-42-{i}")));
        assert_eq!(data.properties().unwrap().get("index"), Some(&AmqpSimpleValue::Int(i as i32)));
        assert_eq!(received.partition_key().as_deref(), Some("twin-42"));
        assert!(received.enqueued_time().is_some());
        assert!(received.offset().is_some());
    }
    let sequence_numbers: Vec<i64> = events.iter().map(|e| e.sequence_number().unwrap()).collect();
    assert_eq!(sequence_numbers, (0..stored.len() as i64).collect::<Vec<_>>());

    // From an explicit partition, from a sequence number (exclusive).
    let from_seq = Some(OpenReceiverOptions {
        start_position: Some(StartPosition { location: StartLocation::SequenceNumber(0), inclusive: false }),
        ..Default::default()
    });
    let receiver1 =
        within("open receiver", consumer.open_receiver_on_partition("1".into(), from_seq)).await.unwrap();
    let rest = read_events(&receiver1, p1.len() - 1).await;
    assert_eq!(rest[0].sequence_number(), Some(1));

    let stats = standin.stats();
    assert!(stats.put_tokens_accepted >= 3, "{stats:?}");
    assert_eq!(stats.put_tokens_refused, 0);
    assert_eq!(stats.entities[&format!("{NS}/twins")].transfers_accepted, 3);
    assert_eq!(stats.entities[&format!("{NS}/twins")].messages_stored, 6);

    // Detaches are echoed: closing returns.
    within("receiver close", receiver.close()).await.unwrap();
    within("receiver close", receiver1.close()).await.unwrap();
    within("consumer close", consumer.close()).await.unwrap();
    within("producer close", producer.close()).await.unwrap();
}

#[tokio::test]
async fn event_hubs_reader_waits_for_new_events() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let consumer = consumer(&standin, "twins").await;
    let latest = Some(OpenReceiverOptions {
        start_position: Some(StartPosition { location: StartLocation::Latest, inclusive: false }),
        ..Default::default()
    });
    let producer = producer(&standin, "twins", good_credential()).await;
    let send = |twin: &'static str| {
        let producer = &producer;
        async move {
            let to_two = Some(EventDataBatchOptions { partition_id: Some("2".into()), ..Default::default() });
            let batch = producer.create_batch(to_two).await.unwrap();
            batch.try_add_event_data(event(7, twin), None).unwrap();
            producer.send_batch(batch, None).await.unwrap();
        }
    };
    // An event from before the reader: "latest" skips it.
    within("send", send("early")).await;
    let receiver =
        within("open receiver", consumer.open_receiver_on_partition("2".into(), latest)).await.unwrap();
    let mut stream = receiver.stream_events();
    let send_later = async {
        // The reader attaches on its first poll; give it a moment, then send.
        tokio::time::sleep(Duration::from_millis(300)).await;
        send("late").await;
    };
    let (received, ()) = within("a new event", async { tokio::join!(stream.next(), send_later) }).await;
    let received = received.unwrap().unwrap();
    assert_eq!(received.event_data().message_id(), Some(&MessageId::String("late-evt-7".into())));
    assert_eq!(received.sequence_number(), Some(1));
}

#[tokio::test]
async fn event_hubs_clients_are_refused_bad_tokens() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig {
        namespaces: vec![NamespaceDef {
            denied_object_ids: vec!["denied-oid".into()],
            ..NamespaceDef::default()
        }],
        ..AmqpConfig::default()
    })
    .await
    .unwrap();
    let cases = [
        (
            "wrong audience",
            credential("https://storage.azure.com", OID, DEV_SIGNING_KEY, 3600),
            "InvalidAudience",
        ),
        ("expired", credential(EVENT_HUBS, OID, DEV_SIGNING_KEY, -60), "expired"),
        ("other key", credential(EVENT_HUBS, OID, b"another-key", 3600), "signature"),
        (
            "no role",
            credential(EVENT_HUBS, "denied-oid", DEV_SIGNING_KEY, 3600),
            "'Send' claim(s) are required",
        ),
    ];
    for (i, (case, credential, expected)) in cases.into_iter().enumerate() {
        let producer = producer(&standin, "twins", credential).await;
        let error = within("properties", producer.get_eventhub_properties()).await.expect_err(case);
        let text = chain(&error);
        assert!(text.contains(expected), "{case}: {text}");
        let error = match within("create batch", producer.create_batch(None)).await {
            Err(error) => error,
            Ok(_) => panic!("{case}: a batch without authorization"),
        };
        let text = chain(&error);
        assert!(text.contains("401") || text.contains("Unauthorized"), "{case}: {text}");
        let stats = standin.stats();
        assert_eq!(stats.put_tokens_refused, 2 * (i as u64 + 1), "{case}: {stats:?}");
        assert_eq!(stats.put_tokens_accepted, 0, "{case}");
    }
    assert!(standin.stored(NS, "twins").is_empty());
}

#[tokio::test]
async fn max_message_size_is_advertised_and_enforced() {
    let standin =
        AmqpStandIn::start(AmqpConfig { max_message_size: 2048, ..AmqpConfig::default() }).await.unwrap();
    let producer = producer(&standin, "twins", good_credential()).await;
    let batch = within("create batch", producer.create_batch(None)).await.unwrap();
    let big = EventData::builder().with_body(vec![b'x'; 4000]).build();
    assert!(!batch.try_add_event_data(big, None).unwrap(), "the SDK sizes batches from the advertised limit");

    let sb = ServiceBus::connect(&standin, NS).await;
    sb.authorize_sas("twin-queue").await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    assert_eq!(within("max size", sender.max_message_size()).await.unwrap(), Some(2048));
    let error = rejected(within("send", sender.send(message("big", &vec![b'x'; 4000]), None)).await.unwrap());
    assert_eq!(error.condition, AmqpErrorCondition::LinkPayloadSizeExceeded);
    assert!(error.description.unwrap().contains("exceeds the limit (2048 bytes)"));
    // The link stays usable.
    accepted(within("send", sender.send(message("small", b"ok"), None)).await.unwrap());
    let stats = standin.stats();
    let queue = &stats.entities[&format!("{NS}/twin-queue")];
    assert_eq!((queue.transfers_accepted, queue.transfers_rejected, queue.messages_stored), (1, 1, 1));
}

/// A Service Bus client built from `azure_core_amqp` parts, as the daemon's sink is.
struct ServiceBus {
    connection: AmqpConnection,
    session: AmqpSession,
    cbs: AmqpClaimsBasedSecurity,
    namespace: String,
}

/// A shared access signature, signed here independently of the stand-in's own code: HMAC-SHA256
/// with the key's UTF-8 bytes over `<url-encoded uri>\n<expiry>`.
fn sas(resource: &str, key_name: &str, key: &str, expiry: i64) -> String {
    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02x}"),
            })
            .collect()
    }
    let sr = encode(resource);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={key_name}", encode(&sig))
}

fn message(id: &str, body: &[u8]) -> AmqpMessage {
    AmqpMessage::builder()
        .with_body(body.to_vec())
        .with_properties(AmqpMessageProperties {
            message_id: Some(id.to_owned().into()),
            content_type: Some("application/json".into()),
            subject: Some("Microsoft.DigitalTwins.Twin.Create".into()),
            ..Default::default()
        })
        .add_application_property("cloudEvents:id".into(), id.to_owned())
        .add_application_property("cloudEvents:specversion".into(), "1.0")
        .add_application_property("attempt".into(), 1i32)
        .build()
}

impl ServiceBus {
    async fn connect(standin: &AmqpStandIn, namespace: &str) -> ServiceBus {
        let connection = AmqpConnection::new();
        within(
            "connection open",
            connection.open(
                "twinroute-test".into(),
                Url::parse(&format!("amqps://{namespace}")).unwrap(),
                Some(AmqpConnectionOptions {
                    custom_endpoint: Some(Url::parse(&standin.endpoint()).unwrap()),
                    ..Default::default()
                }),
            ),
        )
        .await
        .unwrap();
        let session = AmqpSession::new();
        within("session begin", session.begin(&connection, None)).await.unwrap();
        let cbs = AmqpClaimsBasedSecurity::new(session.clone()).unwrap();
        within("cbs attach", cbs.attach()).await.unwrap();
        ServiceBus { connection, session, cbs, namespace: namespace.to_owned() }
    }

    async fn authorize(
        &self,
        entity: &str,
        token_type: Option<&str>,
        token: String,
        expires: i64,
    ) -> Result<(), AmqpError> {
        let audience = format!("amqps://{}/{entity}", self.namespace);
        let expires_on = OffsetDateTime::from_unix_timestamp(expires).unwrap();
        within(
            "put-token",
            self.cbs.authorize_path(audience, token_type.map(str::to_owned), &Secret::new(token), expires_on),
        )
        .await
    }

    async fn authorize_sas(&self, entity: &str) -> Result<(), AmqpError> {
        let expiry = now() + 3600;
        let token = sas(&format!("sb://{}/{entity}", self.namespace), DEV_SAS_KEY_NAME, DEV_SAS_KEY, expiry);
        self.authorize(entity, Some(TOKEN_TYPE_SAS), token, expiry).await
    }

    async fn sender(&self, target: &str) -> Result<AmqpSender, AmqpError> {
        // Link names are unique per session, and a link the stand-in detached keeps its name
        // until the client notices.
        static LINKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sender = AmqpSender::new();
        within(
            "sender attach",
            sender.attach(&self.session, format!("{target}-sender-{n}"), target.to_owned(), None),
        )
        .await?;
        Ok(sender)
    }

    /// A peek-lock receiver (azure_core_amqp 1.1 has no receive-and-delete: it cannot set the
    /// sender settle mode).
    async fn receiver(&self, source: &str) -> Result<AmqpReceiver, AmqpError> {
        let receiver = AmqpReceiver::new();
        let options = AmqpReceiverOptions {
            name: Some(format!("{source}-receiver")),
            credit_mode: Some(ReceiverCreditMode::Auto(10)),
            auto_accept: false,
            ..Default::default()
        };
        let source = AmqpSource::builder().with_address(source.to_owned()).build();
        within("receiver attach", receiver.attach(&self.session, source, Some(options))).await?;
        Ok(receiver)
    }
}

/// `AmqpSendOutcome` has no `Debug`: describe it for assertion messages.
fn describe(outcome: &AmqpSendOutcome) -> String {
    match outcome {
        AmqpSendOutcome::Accepted => "Accepted".into(),
        AmqpSendOutcome::Rejected(error) => format!("Rejected({error:?})"),
        AmqpSendOutcome::Released => "Released".into(),
        AmqpSendOutcome::Modified(_) => "Modified".into(),
    }
}

fn accepted(outcome: AmqpSendOutcome) {
    assert!(matches!(outcome, AmqpSendOutcome::Accepted), "{}", describe(&outcome));
}

fn rejected(outcome: AmqpSendOutcome) -> AmqpDescribedError {
    match outcome {
        AmqpSendOutcome::Rejected(Some(error)) => error,
        other => panic!("expected a rejection with an error, got {}", describe(&other)),
    }
}

fn send_error<T>(result: Result<T, AmqpError>, what: &str) -> AmqpError {
    match result {
        Ok(_) => panic!("{what}: expected an error"),
        Err(error) => error,
    }
}

fn annotation(message: &AmqpMessage, name: &str) -> Option<AmqpValue> {
    message.message_annotations.as_ref()?.0.iter().find_map(|(k, v)| match k {
        AmqpAnnotationKey::Symbol(s) if s.0 == name => Some(v.clone()),
        _ => None,
    })
}

fn assert_same_message(received: &AmqpMessage, id: &str, body: &[u8]) {
    let properties = received.properties.as_ref().unwrap();
    assert_eq!(properties.message_id, Some(AmqpMessageId::String(id.into())));
    assert_eq!(properties.content_type, Some(AmqpSymbol::from("application/json")));
    assert_eq!(properties.subject.as_deref(), Some("Microsoft.DigitalTwins.Twin.Create"));
    let app = &received.application_properties.as_ref().unwrap().0;
    assert_eq!(app.get("cloudEvents:id"), Some(&AmqpSimpleValue::String(id.into())));
    assert_eq!(app.get("cloudEvents:specversion"), Some(&AmqpSimpleValue::String("1.0".into())));
    assert_eq!(app.get("attempt"), Some(&AmqpSimpleValue::Int(1)));
    assert_eq!(received.body, AmqpMessageBody::Binary(vec![body.to_vec()]));
    assert!(matches!(annotation(received, "x-opt-sequence-number"), Some(AmqpValue::Long(_))));
    assert!(matches!(annotation(received, "x-opt-enqueued-time"), Some(AmqpValue::TimeStamp(_))));
}

#[tokio::test]
async fn service_bus_queue_and_topic_with_sas_through_azure_core_amqp() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let sb = ServiceBus::connect(&standin, NS).await;

    // Queue: a SAS for the queue, a bare-name sender.
    sb.authorize_sas("twin-queue").await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    for i in 0..2 {
        accepted(within("send", sender.send(message(&format!("q-{i}"), b"{\"q\":1}"), None)).await.unwrap());
    }
    // Topic: a namespace-wide SAS, a full-URL sender.
    let expiry = now() + 3600;
    let token = sas(&format!("sb://{NS}/"), DEV_SAS_KEY_NAME, DEV_SAS_KEY, expiry);
    sb.authorize("twin-topic", Some(TOKEN_TYPE_SAS), token, expiry).await.unwrap();
    let topic_sender = sb.sender(&format!("amqps://{NS}/twin-topic")).await.unwrap();
    accepted(within("send", topic_sender.send(message("t-0", b"{\"t\":0}"), None)).await.unwrap());

    // Peek-lock receive: release puts the message back in place, accept removes it.
    let receiver = sb.receiver("twin-queue").await.unwrap();
    let first = within("receive", receiver.receive_delivery()).await.unwrap();
    assert_same_message(first.message(), "q-0", b"{\"q\":1}");
    assert!(matches!(annotation(first.message(), "x-opt-locked-until"), Some(AmqpValue::TimeStamp(_))));
    let second = within("receive", receiver.receive_delivery()).await.unwrap();
    assert_same_message(second.message(), "q-1", b"{\"q\":1}");
    within("release", receiver.release_delivery(&first)).await.unwrap();
    let again = within("receive", receiver.receive_delivery()).await.unwrap();
    assert_same_message(again.message(), "q-0", b"{\"q\":1}");
    assert_eq!(annotation(again.message(), "x-opt-sequence-number"), Some(AmqpValue::Long(1)));
    within("accept", receiver.accept_delivery(&again)).await.unwrap();
    within("reject", receiver.reject_delivery(&second)).await.unwrap();
    // Settlements travel asynchronously; wait until the queue reflects them.
    within("settlement", async {
        while standin.stats().entities[&format!("{NS}/twin-queue")].messages_stored != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let dead = standin.stored(NS, "twin-queue/$DeadLetterQueue");
    assert_eq!(
        dead.iter().map(|m| m.message_id().unwrap()).collect::<Vec<_>>(),
        ["q-1"],
        "rejected: dead-lettered"
    );

    // The topic's subscription, covered by the namespace-wide token.
    let sub = sb.receiver("twin-topic/Subscriptions/all").await.unwrap();
    let delivery = within("receive", sub.receive_delivery()).await.unwrap();
    assert_same_message(delivery.message(), "t-0", b"{\"t\":0}");
    within("accept", sub.accept_delivery(&delivery)).await.unwrap();

    // A batch (message-format 0x80013700) is unpacked: 3 messages in one transfer.
    let mut envelope = AmqpMessage::builder().build();
    let parts: Vec<Vec<u8>> =
        (0..3).map(|i| AmqpMessage::serialize(&message(&format!("b-{i}"), b"{\"b\":1}")).unwrap()).collect();
    envelope.set_message_body(parts);
    let options = AmqpSendOptions { message_format: Some(BATCH_MESSAGE_FORMAT), ..Default::default() };
    accepted(within("send batch", sender.send(envelope, Some(options))).await.unwrap());
    for i in 0..3 {
        let delivery = within("receive", receiver.receive_delivery()).await.unwrap();
        assert_same_message(delivery.message(), &format!("b-{i}"), b"{\"b\":1}");
        within("accept", receiver.accept_delivery(&delivery)).await.unwrap();
    }

    let stats = standin.stats();
    assert_eq!(stats.entities[&format!("{NS}/twin-topic")].messages_stored, 1);
    assert_eq!(stats.entities[&format!("{NS}/twin-queue")].transfers_accepted, 3);

    within("detach", sender.detach()).await.unwrap();
    within("detach", receiver.detach()).await.unwrap();
    within("detach", sub.detach()).await.unwrap();
    within("cbs detach", sb.cbs.detach()).await.unwrap();
    within("session end", sb.session.end()).await.unwrap();
    within("connection close", sb.connection.close()).await.unwrap();
}

#[tokio::test]
async fn service_bus_refusals() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let sb = ServiceBus::connect(&standin, NS).await;

    // A SAS with a bad signature: put-token answers 401.
    let expiry = now() + 3600;
    let forged = sas(&format!("sb://{NS}/twin-queue"), DEV_SAS_KEY_NAME, "not-the-key", expiry);
    let error = sb.authorize("twin-queue", Some(TOKEN_TYPE_SAS), forged, expiry).await.unwrap_err();
    let AmqpErrorKind::ManagementStatusCode(status, Some(description)) = error.kind() else {
        panic!("{error:?}")
    };
    assert_eq!(u16::from(*status), 401);
    assert!(description.contains("Bad SAS signature"), "{description}");
    assert!(!description.contains("sig="), "the token is not echoed: {description}");
    // A key name the namespace does not have.
    let unknown = sas(&format!("sb://{NS}/twin-queue"), "SendOnly", DEV_SAS_KEY, expiry);
    let error = sb.authorize("twin-queue", Some(TOKEN_TYPE_SAS), unknown, expiry).await.unwrap_err();
    assert!(format!("{error:?}").contains("Unknown SAS key name 'SendOnly'"), "{error:?}");
    // A JWT for Event Hubs is not one for Service Bus.
    let (token, _) = jwt_token(EVENT_HUBS, OID, DEV_SIGNING_KEY, 3600);
    let error = sb.authorize("twin-queue", None, token, now() + 3600).await.unwrap_err();
    assert!(format!("{error:?}").contains("InvalidAudience"), "{error:?}");
    assert_eq!(standin.stats().put_tokens_refused, 3);

    // No token: the attach is refused with unauthorized-access.
    let error = send_error(sb.sender("twin-queue").await, "no token, no link");
    let AmqpErrorKind::AmqpDescribedError(described) = error.kind() else { panic!("{error:?}") };
    assert_eq!(described.condition, AmqpErrorCondition::UnauthorizedAccess);
    // An entity that does not exist: not-found.
    let error = send_error(sb.sender("no-such-queue").await, "unknown entity");
    let AmqpErrorKind::AmqpDescribedError(described) = error.kind() else { panic!("{error:?}") };
    assert_eq!(described.condition, AmqpErrorCondition::NotFound);
    assert!(described.description.as_deref().unwrap().contains("no-such-queue"));
    assert_eq!(standin.stats().attaches_refused, 2);

    // A Service Bus JWT works, and the session is still usable after the refusals.
    let (token, _) = jwt_token(SERVICE_BUS, OID, DEV_SIGNING_KEY, 3600);
    sb.authorize("twin-queue", None, token, now() + 3600).await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    accepted(within("send", sender.send(message("ok", b"1"), None)).await.unwrap());
}

#[tokio::test]
async fn a_link_stops_taking_messages_when_its_token_expires() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let sb = ServiceBus::connect(&standin, NS).await;
    let expiry = now() + 2;
    let token = sas(&format!("sb://{NS}/twin-queue"), DEV_SAS_KEY_NAME, DEV_SAS_KEY, expiry);
    sb.authorize("twin-queue", Some(TOKEN_TYPE_SAS), token, expiry).await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    accepted(within("send", sender.send(message("before", b"1"), None)).await.unwrap());
    // Tokens carry wall-clock times: wait for this one to run out.
    within("expiry", async {
        while now() < expiry {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let error = rejected(within("send", sender.send(message("after", b"2"), None)).await.unwrap());
    assert_eq!(error.condition, AmqpErrorCondition::UnauthorizedAccess);
    assert!(error.description.unwrap().contains(&format!("expired at {expiry}")));
    assert_eq!(standin.stored(NS, "twin-queue").len(), 1);
}

#[tokio::test]
async fn faults_reject_detach_and_drop() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let sb = ServiceBus::connect(&standin, NS).await;
    sb.authorize_sas("twin-queue").await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();

    standin.push_faults(
        "twin-queue",
        [
            AmqpFault::Reject {
                condition: "com.microsoft:server-busy".into(),
                description: "busy, try later".into(),
            },
            AmqpFault::Delay(Duration::from_millis(50)),
        ],
    );
    assert_eq!(standin.stats().pending_faults["twin-queue"].len(), 2);
    let error = rejected(within("send", sender.send(message("f-0", b"0"), None)).await.unwrap());
    assert_eq!(error.condition, AmqpErrorCondition::ServerBusyError);
    assert_eq!(error.description.as_deref(), Some("busy, try later"));
    // A delay still accepts.
    accepted(within("send", sender.send(message("f-1", b"1"), None)).await.unwrap());
    assert_eq!(standin.stored(NS, "twin-queue").len(), 1, "the rejected message is not stored");

    // DetachLink: that transfer is rejected with detach-forced, the next send fails.
    standin.push_faults("TWIN-QUEUE", [AmqpFault::DetachLink]);
    let error = rejected(within("send", sender.send(message("f-2", b"2"), None)).await.unwrap());
    assert_eq!(error.condition.to_string(), "amqp:link:detach-forced");
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_error(
        within("send after detach", sender.send(message("f-3", b"3"), None)).await,
        "the link is gone",
    );

    // DropConnection: the socket closes; sends fail from then on.
    let sender = sb.sender("twin-queue").await.unwrap();
    standin.push_faults("twin-queue", [AmqpFault::DropConnection]);
    // fe2o3 may leave the in-flight send waiting forever for an outcome; don't wait on it long.
    let in_flight =
        tokio::time::timeout(Duration::from_secs(2), sender.send(message("f-4", b"4"), None)).await;
    if let Ok(Ok(outcome)) = &in_flight {
        assert!(!matches!(outcome, AmqpSendOutcome::Accepted), "{}", describe(outcome));
    }
    send_error(
        within("send after drop", sender.send(message("f-5", b"5"), None)).await,
        "the connection is gone",
    );
    let stats = standin.stats();
    assert_eq!(stats.connections_open, 0, "{stats:?}");
    assert_eq!(stats.entities[&format!("{NS}/twin-queue")].transfers_rejected, 2);
    assert!(stats.pending_faults.is_empty());
    assert_eq!(standin.stored(NS, "twin-queue").len(), 1);
}

#[tokio::test]
async fn event_hubs_producer_sees_injected_rejections() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let producer = producer(&standin, "twins", good_credential()).await;
    let to_zero = || Some(EventDataBatchOptions { partition_id: Some("0".into()), ..Default::default() });
    standin.push_faults(
        "twins/Partitions/0",
        [AmqpFault::Reject { condition: "amqp:not-found".into(), description: "gone".into() }],
    );
    let batch = within("create batch", producer.create_batch(to_zero())).await.unwrap();
    batch.try_add_event_data(event(0, "x"), None).unwrap();
    let error = within("send", producer.send_batch(batch, None)).await.expect_err("rejected");
    assert!(format!("{error:?}").contains("NotFound"), "{error:?}");
    let batch = within("create batch", producer.create_batch(to_zero())).await.unwrap();
    batch.try_add_event_data(event(1, "x"), None).unwrap();
    within("send", producer.send_batch(batch, None)).await.unwrap();
    assert_eq!(standin.stored(NS, "twins/Partitions/0").len(), 1);
}

#[tokio::test]
async fn namespaces_are_chosen_by_the_open_hostname() {
    let other = NamespaceDef {
        hubs: vec![HubDef { name: "other-hub".into(), partition_count: 2 }],
        queues: vec!["twin-queue".into()],
        sas_keys: vec![("key".into(), "other-secret".into())],
        ..NamespaceDef::new("Other.servicebus.windows.net")
    };
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig {
        namespaces: vec![NamespaceDef::default(), other],
        ..AmqpConfig::default()
    })
    .await
    .unwrap();
    let sb = ServiceBus::connect(&standin, "other.servicebus.windows.net").await;
    // The default namespace's key means nothing here.
    assert!(sb.authorize_sas("twin-queue").await.is_err());
    let expiry = now() + 60;
    let token = sas("sb://other.servicebus.windows.net/twin-queue", "key", "other-secret", expiry);
    sb.authorize("twin-queue", Some(TOKEN_TYPE_SAS), token, expiry).await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    within("send", sender.send(message("o-1", b"1"), None)).await.unwrap();
    assert_eq!(standin.stored("other.servicebus.windows.net", "twin-queue").len(), 1);
    assert!(standin.stored(NS, "twin-queue").is_empty());

    let producer = within(
        "producer",
        ProducerClient::builder()
            .with_custom_endpoint(standin.endpoint())
            .with_retry_options(quick_retries())
            .open("other.servicebus.windows.net", "other-hub", good_credential()),
    )
    .await
    .unwrap();
    let properties = within("properties", producer.get_eventhub_properties()).await.unwrap();
    assert_eq!(properties.partition_ids, ["0", "1"]);
}

#[tokio::test]
async fn admin_surface_steers_the_stand_in() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let admin = standin.serve_admin("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{admin}/_standin");

    let body = serde_json::json!({
        "entity": "twin-queue",
        "faults": [{"kind": "reject", "condition": "com.microsoft:server-busy"}, {"kind": "delay", "ms": 5}]
    });
    let response = client.post(format!("{base}/faults")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let stats: AmqpStats = response.json().await.unwrap();
    assert_eq!(stats.pending_faults["twin-queue"].len(), 2);

    let sb = ServiceBus::connect(&standin, NS).await;
    sb.authorize_sas("twin-queue").await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    let error = rejected(within("send", sender.send(message("a-0", b"0"), None)).await.unwrap());
    assert_eq!(error.condition, AmqpErrorCondition::ServerBusyError);

    let stats: AmqpStats = client.get(format!("{base}/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats.connections_open, 1);
    assert_eq!(stats.entities[&format!("{NS}/twin-queue")].transfers_rejected, 1);

    let response = client.post(format!("{base}/drop-connections")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // Let the client notice the closed socket (a send racing it may wait forever; see above).
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_error(within("send after drop", sender.send(message("a-1", b"1"), None)).await, "dropped");

    let bad = client
        .post(format!("{base}/faults"))
        .json(&serde_json::json!({"entity": "q", "faults": [{"kind": "explode"}]}));
    assert_eq!(bad.send().await.unwrap().status(), 422);
}

#[tokio::test]
async fn start_refuses_non_loopback_and_bad_config() {
    let error = AmqpStandIn::start_on("0.0.0.0:0".parse().unwrap(), AmqpConfig::default()).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    let bad = AmqpConfig {
        namespaces: vec![NamespaceDef {
            hubs: vec![HubDef { name: "twin-queue".into(), partition_count: 0 }],
            ..NamespaceDef::default()
        }],
        ..AmqpConfig::default()
    };
    let error = AmqpStandIn::start(bad).await.unwrap_err().to_string();
    assert!(error.contains("used twice") && error.contains("1 to 1024 partitions"), "{error}");
    let debug = format!("{:?}", AmqpConfig::default());
    assert!(!debug.contains(DEV_SAS_KEY) && debug.contains("RootManageSharedAccessKey"), "{debug}");
}

#[tokio::test]
async fn shutdown_stops_listening_and_drops_clients() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let addr = standin.addr();
    let sb = ServiceBus::connect(&standin, NS).await;
    sb.authorize_sas("twin-queue").await.unwrap();
    let sender = sb.sender("twin-queue").await.unwrap();
    let clone = standin.clone();
    standin.shutdown().await;
    // A send racing the shutdown may wait forever for its outcome (fe2o3 0.14 does not fail
    // deliveries in flight when the connection dies); once the client has seen the socket
    // close, sends fail.
    let in_flight = tokio::time::timeout(Duration::from_secs(1), sender.send(message("s", b"1"), None)).await;
    assert!(!matches!(in_flight, Ok(Ok(AmqpSendOutcome::Accepted))));
    send_error(within("send after shutdown", sender.send(message("s", b"2"), None)).await, "stopped");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer listening");
    drop(clone);
}

/// A bare fe2o3 client, to do what the Azure SDK cannot: reply links without a target (as the
/// JavaScript SDK attaches them), receive-and-delete, link properties such as the epoch
/// (azure_core_amqp 1.1 on fe2o3 0.14.1 loses link properties: fe2o3's link builder resets them
/// in `name()`, which azure_core_amqp calls after setting them).
mod raw {
    use super::*;
    use fe2o3_amqp::connection::ConnectionHandle;
    use fe2o3_amqp::link::delivery::Delivery;
    use fe2o3_amqp::sasl_profile::SaslProfile;
    use fe2o3_amqp::session::SessionHandle;
    use fe2o3_amqp::types::definitions::{Fields, SenderSettleMode};
    use fe2o3_amqp::types::messaging::{
        ApplicationProperties, Body, Message, MessageId as RawMessageId, Properties,
    };
    use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
    use fe2o3_amqp::{Connection, Receiver, Sender, Session};

    pub struct Client {
        pub connection: ConnectionHandle<()>,
        pub session: SessionHandle<()>,
        cbs: Option<(Sender, Receiver)>,
        requests: u64,
    }

    impl Client {
        pub async fn connect(standin: &AmqpStandIn) -> Client {
            let mut connection = within(
                "raw open",
                Connection::builder()
                    .container_id("raw-fe2o3")
                    .hostname(NS)
                    .sasl_profile(SaslProfile::Anonymous)
                    .open(standin.endpoint().as_str()),
            )
            .await
            .unwrap();
            let session = within("raw begin", Session::begin(&mut connection)).await.unwrap();
            Client { connection, session, cbs: None, requests: 0 }
        }

        /// A put-token; the reply link has no target, so the stand-in routes by its name.
        /// Returns the status code, description and correlation-id.
        pub async fn put_token(
            &mut self,
            audience: &str,
            token: &str,
        ) -> (i32, String, Option<RawMessageId>) {
            if self.cbs.is_none() {
                let sender =
                    within("cbs sender", Sender::attach(&mut self.session, "raw-cbs-sender", "$cbs"))
                        .await
                        .unwrap();
                let receiver = within(
                    "cbs receiver",
                    Receiver::builder().name("raw-cbs-replies").source("$cbs").attach(&mut self.session),
                )
                .await
                .unwrap();
                self.cbs = Some((sender, receiver));
            }
            let (sender, receiver) = self.cbs.as_mut().unwrap();
            self.requests += 1;
            let request = Message::builder()
                .properties(Properties {
                    message_id: Some(RawMessageId::String(format!("req-{}", self.requests))),
                    reply_to: Some("raw-cbs-replies".into()),
                    ..Default::default()
                })
                .application_properties(
                    ApplicationProperties::builder()
                        .insert("operation", "put-token")
                        .insert("type", "jwt")
                        .insert("name", audience)
                        .build(),
                )
                .value(token.to_owned())
                .build();
            within("cbs request", sender.send(request)).await.unwrap();
            let reply: Delivery<Body<Value>> = within("cbs reply", receiver.recv()).await.unwrap();
            receiver.accept(&reply).await.unwrap();
            let reply = reply.into_message();
            let properties = reply.application_properties.unwrap().0;
            let status = match properties.get("status-code") {
                Some(SimpleValue::Int(code)) => *code,
                other => panic!("status-code {other:?}"),
            };
            let description = match properties.get("status-description") {
                Some(SimpleValue::String(text)) => text.clone(),
                other => panic!("status-description {other:?}"),
            };
            (status, description, reply.properties.and_then(|p| p.correlation_id))
        }

        pub async fn epoch_reader(
            &mut self,
            name: &str,
            partition: &str,
            epoch: i64,
        ) -> Result<Receiver, String> {
            let mut properties = Fields::default();
            properties.insert(Symbol::from("com.microsoft:epoch"), Value::Long(epoch));
            // Properties after `name()`: fe2o3's builder drops them there.
            let receiver = Receiver::builder()
                .name(name)
                .source(format!("amqps://{NS}/twins/ConsumerGroups/$Default/Partitions/{partition}"))
                .properties(properties)
                .attach(&mut self.session);
            within("epoch reader attach", receiver).await.map_err(|e| format!("{e:?}"))
        }

        pub async fn receive_and_delete(&mut self, source: &str) -> Receiver {
            let receiver = Receiver::builder()
                .name(format!("{source}-settled"))
                .source(source)
                .sender_settle_mode(SenderSettleMode::Settled)
                .attach(&mut self.session);
            within("settled receiver attach", receiver).await.unwrap()
        }
    }
}

#[tokio::test]
async fn cbs_replies_route_by_link_name_and_receive_and_delete() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let mut client = raw::Client::connect(&standin).await;
    let (expired, _) = jwt_token(SERVICE_BUS, OID, DEV_SIGNING_KEY, -5);
    let (status, description, correlation) =
        client.put_token(&format!("amqps://{NS}/twin-queue"), &expired).await;
    assert_eq!(status, 401);
    assert!(description.contains("expired at"), "{description}");
    assert!(!description.contains(&expired[..30]), "the token is not echoed");
    assert_eq!(correlation, Some(fe2o3_amqp::types::messaging::MessageId::String("req-1".into())));
    let (token, _) = jwt_token(SERVICE_BUS, OID, DEV_SIGNING_KEY, 600);
    let (status, description, correlation) = client.put_token(&format!("sb://{NS}/twin-queue"), &token).await;
    assert_eq!((status, description.as_str()), (202, "Accepted"));
    assert_eq!(correlation, Some(fe2o3_amqp::types::messaging::MessageId::String("req-2".into())));

    let mut sender =
        within("sender", fe2o3_amqp::Sender::attach(&mut client.session, "raw-sender", "twin-queue"))
            .await
            .unwrap();
    for i in 0..2 {
        within("send", sender.send(format!("message {i}"))).await.unwrap().accepted_or_else(|o| o).unwrap();
    }
    let mut receiver = client.receive_and_delete("twin-queue").await;
    for i in 0..2 {
        let delivery: fe2o3_amqp::link::delivery::Delivery<String> =
            within("receive", receiver.recv()).await.unwrap();
        assert_eq!(delivery.body(), &format!("message {i}"));
    }
    let stats = standin.stats();
    let queue = &stats.entities[&format!("{NS}/twin-queue")];
    assert_eq!(
        (queue.messages_stored, queue.messages_delivered),
        (0, 2),
        "receive-and-delete removes on sending"
    );
    within("close", receiver.close()).await.unwrap();
    within("close", sender.close()).await.unwrap();
    within("end", client.session.end()).await.unwrap();
    within("close", client.connection.close()).await.unwrap();
}

#[tokio::test]
async fn a_reader_with_an_epoch_displaces_the_official_consumer() {
    init_tracing();
    let standin = AmqpStandIn::start(AmqpConfig::default()).await.unwrap();
    let consumer = consumer(&standin, "twins").await;
    let receiver = within("open receiver", consumer.open_receiver_on_partition("0".into(), from_earliest()))
        .await
        .unwrap();
    let mut stream = receiver.stream_events();

    let mut client = raw::Client::connect(&standin).await;
    let (token, _) = jwt_token(EVENT_HUBS, OID, DEV_SIGNING_KEY, 600);
    let audience = format!("amqps://{NS}/twins");
    assert_eq!(client.put_token(&audience, &token).await.0, 202);
    let take_over = async {
        // The official reader attaches on its first poll.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.epoch_reader("owner-5", "0", 5).await.expect("the epoch reader attaches")
    };
    let (kicked, _owner) = within("displacement", async { tokio::join!(stream.next(), take_over) }).await;
    let error = kicked.expect("an item").expect_err("the official reader is disconnected");
    // The SDK reports ConsumerDisconnected only when a receive fails with a described
    // `amqp:link:stolen`; fe2o3 surfaces the detach as a link-state error, so the SDK re-attaches
    // (without its epoch) and that attach is refused with `amqp:link:stolen`.
    let text = chain(&error);
    assert!(
        matches!(error.kind, ErrorKind::ConsumerDisconnected(_)) || text.contains("LinkStolen"),
        "{text}"
    );

    // A lower epoch is refused while the owner holds the partition.
    let refused = client.epoch_reader("owner-3", "0", 3).await.expect_err("a lower epoch is refused");
    assert!(refused.contains("Stolen"), "{refused}");
    assert!(refused.contains("higher epoch 5"), "{refused}");
}
