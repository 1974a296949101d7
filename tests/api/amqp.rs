//! Event Hubs and Service Bus end to end: the daemon with its real AMQP sinks, tokens from the
//! IMDS stand-in or SAS keys, the AMQP stand-in as the service, and the official clients
//! (`azure_messaging_eventhubs`' `ConsumerClient`, an `azure_core_amqp` receiver) reading back
//! what arrived. The wire form is asserted exactly.

use crate::helpers::{spawn_real, telemetry, twin_create, within, TestApp};
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core_amqp::message::{AmqpMessageBody, AmqpMessageId};
use azure_core_amqp::{
    AmqpClaimsBasedSecurity, AmqpClaimsBasedSecurityApis, AmqpConnection, AmqpConnectionApis,
    AmqpConnectionOptions, AmqpDeliveryApis, AmqpMessage, AmqpReceiver, AmqpReceiverApis,
    AmqpReceiverOptions, AmqpSession, AmqpSessionApis, AmqpSimpleValue, AmqpSource, ReceiverCreditMode,
};
use azure_messaging_eventhubs::models::{MessageId, ReceivedEventData};
use azure_messaging_eventhubs::{ConsumerClient, OpenReceiverOptions, StartLocation, StartPosition};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use twinroute::delivery::Health;
use twinroute_emulator::amqp::{
    AmqpConfig, AmqpFault, AmqpStandIn, NamespaceDef, DEFAULT_NAMESPACE, DEV_SAS_KEY, DEV_SAS_KEY_NAME,
};
use twinroute_emulator::imds::{ImdsConfig, ImdsStandIn, DEFAULT_SYSTEM_OBJECT_ID};

const NS: &str = DEFAULT_NAMESPACE;

struct Stack {
    imds: ImdsStandIn,
    amqp: AmqpStandIn,
}

async fn stack(amqp: AmqpConfig) -> Stack {
    Stack {
        imds: ImdsStandIn::start(ImdsConfig::default()).await.unwrap(),
        amqp: AmqpStandIn::start(amqp).await.unwrap(),
    }
}

fn identity_section(stack: &Stack) -> String {
    format!("[identity]\nimds_endpoint = \"{}\"\n", stack.imds.token_url())
}

fn connection_string(key: &str) -> String {
    format!("Endpoint=sb://{NS}/;SharedAccessKeyName={DEV_SAS_KEY_NAME};SharedAccessKey={key}")
}

/// A credential for reading back (the readers are not what is under test).
#[derive(Debug)]
struct ReaderCredential(String);

#[async_trait::async_trait]
impl TokenCredential for ReaderCredential {
    async fn get_token(
        &self,
        _: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let claims = twinroute_emulator::jwt::Claims {
            aud: self.0.clone(),
            iss: "https://sts.windows.net/t/".into(),
            iat: time::OffsetDateTime::now_utc().unix_timestamp(),
            nbf: time::OffsetDateTime::now_utc().unix_timestamp() - 60,
            exp: time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
            appid: "reader".into(),
            oid: "reader".into(),
            sub: "reader".into(),
            tid: "t".into(),
            xms_mirid: None,
        };
        let token = twinroute_emulator::jwt::issue(&claims, twinroute_emulator::DEV_SIGNING_KEY);
        Ok(AccessToken::new(token, time::OffsetDateTime::now_utc() + time::Duration::hours(1)))
    }
}

/// Every event in the hub, read with the official consumer, per partition.
async fn read_hub(stack: &Stack, hub: &str) -> HashMap<String, Vec<ReceivedEventData>> {
    let consumer = within(
        "consumer open",
        ConsumerClient::builder().with_custom_endpoint(stack.amqp.endpoint()).open(
            NS,
            hub.to_owned(),
            Arc::new(ReaderCredential("https://eventhubs.azure.net/".into())),
        ),
    )
    .await
    .unwrap();
    let properties = within("hub properties", consumer.get_eventhub_properties()).await.unwrap();
    let mut all = HashMap::new();
    for partition in properties.partition_ids {
        let p = within("partition properties", consumer.get_partition_properties(&partition)).await.unwrap();
        let count = (p.last_enqueued_sequence_number - p.beginning_sequence_number + 1).max(0) as usize;
        if p.last_enqueued_sequence_number < 0 || count == 0 {
            continue;
        }
        let options = OpenReceiverOptions {
            start_position: Some(StartPosition { location: StartLocation::Earliest, inclusive: false }),
            ..Default::default()
        };
        let receiver =
            within("receiver", consumer.open_receiver_on_partition(partition.clone(), Some(options)))
                .await
                .unwrap();
        let mut stream = receiver.stream_events();
        let mut events = Vec::new();
        while events.len() < count {
            events.push(within("an event", stream.next()).await.unwrap().unwrap());
        }
        all.insert(partition, events);
    }
    all
}

fn string_property(event: &ReceivedEventData, name: &str) -> Option<String> {
    match event.event_data().properties()?.get(name)? {
        AmqpSimpleValue::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The exact set of `cloudEvents:*` properties of an event as ADT sends them.
fn expected_properties(event: &serde_json::Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = event
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "data" | "datacontenttype"))
        .map(|(k, v)| (format!("cloudEvents:{k}"), v.as_str().unwrap().to_owned()))
        .collect();
    v.sort();
    v
}

fn actual_properties(event: &ReceivedEventData) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = event
        .event_data()
        .properties()
        .unwrap()
        .iter()
        .map(|(k, v)| match v {
            AmqpSimpleValue::String(s) => (k.clone(), s.clone()),
            other => (k.clone(), format!("{other:?}")),
        })
        .collect();
    v.sort();
    v
}

async fn route_all(app: &TestApp, endpoint: &str) {
    assert_eq!(app.put_route("all", endpoint, "true").await.status(), 204);
}

#[tokio::test]
async fn event_hubs_identity_based_in_adt_wire_form() {
    let stack = stack(AmqpConfig::default()).await;
    let extra = format!(
        "{}[endpoints.twin-hub]\ntype = \"EventHub\"\nauthentication_type = \"IdentityBased\"\n\
         endpoint_uri = \"sb://{NS}/\"\nentity_path = \"twins\"\ncustom_endpoint = \"{}\"\n",
        identity_section(&stack),
        stack.amqp.endpoint()
    );
    let app = spawn_real(&extra).await;
    route_all(&app, "twin-hub").await;
    let created = twin_create("room-1");
    let telemetry = telemetry("room-1", 31.5);
    let other = twin_create("room-2");
    for e in [&created, &telemetry, &other] {
        assert_eq!(app.post_event(e).await.status(), 202);
    }
    app.stop().await;

    let partitions = read_hub(&stack, "twins").await;
    let all: Vec<&ReceivedEventData> = partitions.values().flatten().collect();
    assert_eq!(all.len(), 3);
    let find = |id: &str| {
        *all.iter()
            .find(|e| e.event_data().message_id() == Some(&MessageId::String(id.to_owned())))
            .expect("sent event arrived")
    };
    for sent in [&created, &telemetry, &other] {
        let got = find(sent["id"].as_str().unwrap());
        assert_eq!(actual_properties(got), expected_properties(sent), "application properties, exactly");
        assert_eq!(got.event_data().content_type(), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(got.event_data().body().unwrap()).unwrap();
        assert_eq!(body, sent["data"]);
    }
    // The body bytes are the data bytes as received (telemetry untouched).
    let got = find(telemetry["id"].as_str().unwrap());
    assert_eq!(got.event_data().body().unwrap(), serde_json::to_vec(&telemetry["data"]).unwrap().as_slice());
    // Partition key = twin id; one twin's events share a partition.
    assert_eq!(find(created["id"].as_str().unwrap()).partition_key().as_deref(), Some("room-1"));
    assert_eq!(got.partition_key().as_deref(), Some("room-1"));
    assert_eq!(find(other["id"].as_str().unwrap()).partition_key().as_deref(), Some("room-2"));
    let partition_of = |id: &str| {
        partitions
            .iter()
            .find(|(_, es)| {
                es.iter().any(|e| e.event_data().message_id() == Some(&MessageId::String(id.into())))
            })
            .map(|(p, _)| p.clone())
            .unwrap()
    };
    assert_eq!(
        partition_of(created["id"].as_str().unwrap()),
        partition_of(telemetry["id"].as_str().unwrap())
    );
    // Tokens came from IMDS, once per audience.
    assert_eq!(stack.imds.requests_for("https://eventhubs.azure.net/"), 1);
    assert!(stack.amqp.stats().put_tokens_accepted >= 1);
}

#[tokio::test]
async fn event_hubs_key_based_fixed_partition_and_no_key() {
    let stack = stack(AmqpConfig::default()).await;
    let extra = format!(
        "[endpoints.hub-p2]\ntype = \"EventHub\"\nconnection_string = \"{};EntityPath=twins\"\n\
         partition_id = \"2\"\ncustom_endpoint = \"{}\"\n",
        connection_string(DEV_SAS_KEY),
        stack.amqp.endpoint()
    );
    let app = spawn_real(&extra).await;
    route_all(&app, "hub-p2").await;
    let batch = serde_json::json!([twin_create("a"), twin_create("b"), telemetry("c", 1.0)]);
    let response = app.post("application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!(response.status(), 202);
    app.stop().await;
    let partitions = read_hub(&stack, "twins").await;
    assert_eq!(partitions.keys().collect::<Vec<_>>(), ["2"], "every event in the fixed partition");
    let events = &partitions["2"];
    assert_eq!(events.len(), 3);
    let ids: Vec<String> = events.iter().map(|e| string_property(e, "cloudEvents:id").unwrap()).collect();
    let sent: Vec<String> =
        batch.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, sent, "in order");
    assert!(events.iter().all(|e| e.partition_key().is_none()));
    assert_eq!(stack.amqp.stats().put_tokens_refused, 0);
}

/// A Service Bus reader on `azure_core_amqp` (the crates.io Service Bus crate cannot read here).
struct SbReader {
    _connection: AmqpConnection,
    session: AmqpSession,
    cbs: AmqpClaimsBasedSecurity,
}

impl SbReader {
    async fn open(stack: &Stack) -> SbReader {
        let connection = AmqpConnection::new();
        within(
            "connection",
            connection.open(
                "reader".into(),
                azure_core::http::Url::parse(&format!("amqps://{NS}")).unwrap(),
                Some(AmqpConnectionOptions {
                    custom_endpoint: Some(azure_core::http::Url::parse(&stack.amqp.endpoint()).unwrap()),
                    ..Default::default()
                }),
            ),
        )
        .await
        .unwrap();
        let session = AmqpSession::new();
        within("session", session.begin(&connection, None)).await.unwrap();
        let cbs = AmqpClaimsBasedSecurity::new(session.clone()).unwrap();
        within("cbs", cbs.attach()).await.unwrap();
        SbReader { _connection: connection, session, cbs }
    }

    async fn read(&self, source: &str, count: usize) -> Vec<AmqpMessage> {
        let entity = source.split('/').next().unwrap();
        let token =
            ReaderCredential("https://servicebus.azure.net".into()).get_token(&[], None).await.unwrap();
        within(
            "put-token",
            self.cbs.authorize_path(
                format!("amqps://{NS}/{entity}"),
                None,
                &Secret::new(token.token.secret().to_owned()),
                token.expires_on,
            ),
        )
        .await
        .unwrap();
        let receiver = AmqpReceiver::new();
        let options = AmqpReceiverOptions {
            name: Some(format!("reader-{}", uuid::Uuid::new_v4())),
            credit_mode: Some(ReceiverCreditMode::Auto(100)),
            auto_accept: false,
            ..Default::default()
        };
        let source = AmqpSource::builder().with_address(source.to_owned()).build();
        within("receiver", receiver.attach(&self.session, source, Some(options))).await.unwrap();
        let mut messages = Vec::new();
        while messages.len() < count {
            let delivery = within("a message", receiver.receive_delivery()).await.unwrap();
            messages.push(delivery.message().clone());
            within("accept", receiver.accept_delivery(&delivery)).await.unwrap();
        }
        within("detach", receiver.detach()).await.unwrap();
        messages
    }
}

fn app_properties(m: &AmqpMessage) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = m
        .application_properties
        .as_ref()
        .unwrap()
        .0
        .iter()
        .map(|(k, v)| match v {
            AmqpSimpleValue::String(s) => (k.clone(), s.clone()),
            other => (k.clone(), format!("{other:?}")),
        })
        .collect();
    v.sort();
    v
}

fn body(m: &AmqpMessage) -> Vec<u8> {
    match &m.body {
        AmqpMessageBody::Binary(parts) => parts.concat(),
        other => panic!("a data body, not {other:?}"),
    }
}

#[tokio::test]
async fn service_bus_queue_identity_based_and_topic_key_based() {
    let stack = stack(AmqpConfig::default()).await;
    let extra = format!(
        "{}[endpoints.twin-queue]\ntype = \"ServiceBus\"\nauthentication_type = \"IdentityBased\"\n\
         endpoint_uri = \"sb://{NS}/\"\nentity_path = \"twin-queue\"\nentity_kind = \"queue\"\nsession_id = \"twin_id\"\n\
         custom_endpoint = \"{amqp}\"\n\
         [endpoints.twin-topic]\ntype = \"ServiceBus\"\nconnection_string = \"{cs};EntityPath=twin-topic\"\ncustom_endpoint = \"{amqp}\"\n",
        identity_section(&stack),
        cs = connection_string(DEV_SAS_KEY),
        amqp = stack.amqp.endpoint()
    );
    let app = spawn_real(&extra).await;
    assert_eq!(app.put_route("to-queue", "twin-queue", "true").await.status(), 204);
    assert_eq!(
        app.put_route("to-topic", "twin-topic", "type = 'microsoft.iot.telemetry'").await.status(),
        204
    );
    let created = twin_create("room-7");
    let telemetry = telemetry("room-8", 12.0);
    for e in [&created, &telemetry] {
        assert_eq!(app.post_event(e).await.status(), 202);
    }
    app.stop().await;

    let reader = SbReader::open(&stack).await;
    let queued = reader.read("twin-queue", 2).await;
    for (got, sent) in queued.iter().zip([&created, &telemetry]) {
        let p = got.properties.as_ref().unwrap();
        assert_eq!(p.message_id, Some(AmqpMessageId::String(sent["id"].as_str().unwrap().to_owned())));
        assert_eq!(p.content_type.as_ref().map(|c| c.0.as_str()), Some("application/json"));
        assert_eq!(app_properties(got), expected_properties(sent));
        assert_eq!(body(got), serde_json::to_vec(&sent["data"]).unwrap());
    }
    let sessions: Vec<Option<&str>> =
        queued.iter().map(|m| m.properties.as_ref().unwrap().group_id.as_deref()).collect();
    assert_eq!(sessions, [Some("room-7"), Some("room-8")], "session id = twin id");
    let from_topic = SbReader::open(&stack).await.read("twin-topic/Subscriptions/all", 1).await;
    assert_eq!(app_properties(&from_topic[0]), expected_properties(&telemetry));
    assert!(from_topic[0].properties.as_ref().unwrap().group_id.is_none());
}

#[tokio::test]
async fn a_refused_identity_makes_the_endpoint_unhealthy_naming_the_role() {
    let namespace = NamespaceDef {
        denied_object_ids: vec![DEFAULT_SYSTEM_OBJECT_ID.to_owned()],
        ..NamespaceDef::default()
    };
    let stack = stack(AmqpConfig { namespaces: vec![namespace], ..Default::default() }).await;
    let extra = format!(
        "[delivery]\nshutdown_timeout_seconds = 1\n{}[endpoints.twin-hub]\ntype = \"EventHub\"\nauthentication_type = \"IdentityBased\"\n\
         endpoint_uri = \"sb://{NS}/\"\nentity_path = \"twins\"\ncustom_endpoint = \"{}\"\n",
        identity_section(&stack),
        stack.amqp.endpoint()
    );
    let mut app = spawn_real(&extra).await;
    route_all(&app, "twin-hub").await;
    assert_eq!(app.post_event(&twin_create("room-1")).await.status(), 202);
    let running = app.running.take().unwrap();
    let handle = running.dispatcher.snapshot().endpoints["twin-hub"].clone();
    let (health, reason) =
        within("unhealthy", handle.stats.wait_for_health(|h| h == Health::Unhealthy)).await;
    assert_eq!(health, Health::Unhealthy);
    let reason = reason.unwrap();
    assert!(
        reason.contains("endpoint twin-hub") && reason.contains("Azure Event Hubs Data Sender"),
        "{reason}"
    );
    assert!(reason.contains(&format!("{NS}/twins")), "{reason}");
    assert!(stack.imds.requests_for("https://eventhubs.azure.net/") >= 2, "the token was refreshed once");
    // Readiness lists the endpoint's health and reason.
    let ready: serde_json::Value =
        app.client.get(format!("{}/readyz", app.admin)).send().await.unwrap().json().await.unwrap();
    let entry =
        ready["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "twin-hub").unwrap().clone();
    assert_eq!(entry["status"], "unhealthy");
    drop(handle);
    let report = within("stop", running.stop()).await;
    assert_eq!(report.undelivered, [("twin-hub".to_owned(), 1)], "nothing disappears silently");
}

#[tokio::test]
async fn a_wrong_sas_key_is_an_auth_failure_and_never_leaks() {
    let stack = stack(AmqpConfig::default()).await;
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let extra = format!(
        "[delivery]\nshutdown_timeout_seconds = 1\n[endpoints.hub-k]\ntype = \"EventHub\"\nconnection_string = \"{};EntityPath=twins\"\ncustom_endpoint = \"{}\"\n",
        connection_string(wrong),
        stack.amqp.endpoint()
    );
    let mut app = spawn_real(&extra).await;
    route_all(&app, "hub-k").await;
    assert_eq!(app.post_event(&twin_create("room-1")).await.status(), 202);
    let running = app.running.take().unwrap();
    let handle = running.dispatcher.snapshot().endpoints["hub-k"].clone();
    let (_, reason) = within("unhealthy", handle.stats.wait_for_health(|h| h == Health::Unhealthy)).await;
    let reason = reason.unwrap();
    assert!(reason.contains("SAS key") && reason.contains(DEV_SAS_KEY_NAME), "{reason}");
    assert!(!reason.contains(wrong) && !reason.contains("sig="), "{reason}");
    assert!(stack.amqp.stats().put_tokens_refused >= 1);
    drop(handle);
    running.stop().await;
}

#[tokio::test]
async fn server_busy_is_retried_and_every_event_arrives() {
    let stack = stack(AmqpConfig::default()).await;
    stack.amqp.push_faults(
        "twin-queue",
        [AmqpFault::Reject { condition: "com.microsoft:server-busy".into(), description: "busy".into() }],
    );
    let extra = format!(
        "[endpoints.sb-q]\ntype = \"ServiceBus\"\nconnection_string = \"{};EntityPath=twin-queue\"\nentity_kind = \"queue\"\ncustom_endpoint = \"{}\"\n",
        connection_string(DEV_SAS_KEY),
        stack.amqp.endpoint()
    );
    let app = spawn_real(&extra).await;
    route_all(&app, "sb-q").await;
    assert_eq!(app.post_event(&twin_create("room-1")).await.status(), 202);
    let handle = app.running.as_ref().unwrap().dispatcher.snapshot().endpoints["sb-q"].clone();
    let (_, reason) = within("degraded", handle.stats.wait_for_health(|h| h == Health::Degraded)).await;
    assert!(reason.unwrap().contains("server-busy"));
    within("recovered", handle.stats.wait_for_health(|h| h == Health::Healthy)).await;
    assert!(handle.stats.failed_attempts.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop(handle);
    app.stop().await;
    let reader = SbReader::open(&stack).await;
    assert_eq!(reader.read("twin-queue", 1).await.len(), 1);
}

/// Waits (bounded) until the endpoint has delivered `n` events.
async fn delivered(app: &TestApp, endpoint: &str, n: u64) {
    let stats = app.running.as_ref().unwrap().dispatcher.snapshot().endpoints[endpoint].stats.clone();
    within("delivery", async {
        while stats.delivered.load(std::sync::atomic::Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_imds_outage_changes_nothing_and_a_revoked_token_is_refreshed() {
    let stack = stack(AmqpConfig::default()).await;
    let extra = format!(
        "{}[endpoints.twin-hub]\ntype = \"EventHub\"\nauthentication_type = \"IdentityBased\"\n\
         endpoint_uri = \"sb://{NS}/\"\nentity_path = \"twins\"\ncustom_endpoint = \"{}\"\n",
        identity_section(&stack),
        stack.amqp.endpoint()
    );
    let app = spawn_real(&extra).await;
    route_all(&app, "twin-hub").await;
    assert_eq!(app.post_event(&twin_create("room-1")).await.status(), 202);
    delivered(&app, "twin-hub", 1).await;
    // IMDS down while the token is valid: nothing changes.
    stack.imds.set_available(false);
    assert_eq!(app.post_event(&twin_create("room-2")).await.status(), 202);
    delivered(&app, "twin-hub", 2).await;
    stack.imds.set_available(true);
    // The service refuses the token (revoked): one forced refresh, and delivery resumes.
    let before = stack.imds.requests_for("https://eventhubs.azure.net/");
    stack.amqp.push_faults(
        "twins",
        [AmqpFault::Reject {
            condition: "amqp:unauthorized-access".into(),
            description: "token revoked".into(),
        }],
    );
    assert_eq!(app.post_event(&twin_create("room-3")).await.status(), 202);
    delivered(&app, "twin-hub", 3).await;
    assert_eq!(stack.imds.requests_for("https://eventhubs.azure.net/"), before + 1, "one forced refresh");
    app.stop().await;
    let all: usize = read_hub(&stack, "twins").await.values().map(Vec::len).sum();
    assert_eq!(all, 3);
}

#[tokio::test]
async fn an_event_too_large_for_the_hub_is_refused_alone() {
    let stack = stack(AmqpConfig { max_message_size: 4096, ..Default::default() }).await;
    let extra = format!(
        "[endpoints.hub-k]\ntype = \"EventHub\"\nconnection_string = \"{};EntityPath=twins\"\npartition_key = \"none\"\ncustom_endpoint = \"{}\"\n",
        connection_string(DEV_SAS_KEY),
        stack.amqp.endpoint()
    );
    let app = spawn_real(&extra).await;
    route_all(&app, "hub-k").await;
    let mut big = twin_create("big");
    big["data"]["blob"] = "x".repeat(6000).into();
    let batch = serde_json::json!([twin_create("a"), big, twin_create("b")]);
    assert_eq!(app.post("application/cloudevents-batch+json", batch.to_string()).await.status(), 202);
    let stats = app.running.as_ref().unwrap().dispatcher.snapshot().endpoints["hub-k"].stats.clone();
    within("the refusal", async {
        while stats.dropped.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(stats.delivered.load(std::sync::atomic::Ordering::Relaxed), 2);
    drop(stats);
    app.stop().await;
    let ids: Vec<String> = read_hub(&stack, "twins")
        .await
        .values()
        .flatten()
        .map(|e| string_property(e, "cloudEvents:id").unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "the two that fit, once each: {ids:?}");
}

/// A TLS front for the stand-in (as Azure's `amqps` port is): TLS with `cert`/`key`, then the
/// bytes go both ways to `backend`. Counts the TLS sessions it completed.
async fn tls_front(
    cert: &std::path::Path,
    key: &std::path::Path,
    backend: String,
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let files = twinroute::config::TlsFiles { cert: cert.to_owned(), key: key.to_owned() };
    let (acceptor, _store) = twinroute::server::tls::CertStore::acceptor("amqp-test", &files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sessions.clone();
    tokio::spawn(async move {
        let _store = _store;
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, backend, counted) = (acceptor.clone(), backend.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, sessions)
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_refused_without_it() {
    let stack = stack(AmqpConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::security::self_signed(dir.path());
    let backend = stack.amqp.endpoint().trim_start_matches("amqp://").trim_end_matches('/').to_owned();
    let (port, sessions) = tls_front(&cert, &key, backend).await;
    let endpoint = |name: &str, ca: &str| {
        format!(
            "[endpoints.{name}]\ntype = \"EventHub\"\nconnection_string = \"{};EntityPath=twins\"\n\
             partition_key = \"none\"\ncustom_endpoint = \"amqps://localhost:{port}\"\n{ca}",
            connection_string(DEV_SAS_KEY)
        )
    };
    let extra = format!(
        "[delivery]\nshutdown_timeout_seconds = 1\n{}{}",
        endpoint("trusting", &format!("ca_file = \"{}\"\n", cert.display())),
        endpoint("untrusting", "")
    );
    let mut app = spawn_real(&extra).await;
    assert_eq!(app.put_route("to-trusting", "trusting", "true").await.status(), 204);
    assert_eq!(app.put_route("to-untrusting", "untrusting", "true").await.status(), 204);
    let batch = serde_json::json!([twin_create("a"), telemetry("a", 1.0)]);
    let response = app.post("application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!(response.status(), 202);
    let running = app.running.take().unwrap();
    // Without the CA the certificate is refused, and the endpoint says so while it retries.
    let untrusting = running.dispatcher.snapshot().endpoints["untrusting"].clone();
    let (health, reason) =
        within("degraded", untrusting.stats.wait_for_health(|h| h != Health::Healthy)).await;
    assert_ne!(health, Health::Healthy);
    let reason = reason.unwrap_or_default();
    assert!(reason.to_lowercase().contains("certificate"), "{reason}");
    drop(untrusting);
    let report = within("stop", running.stop()).await;
    assert_eq!(report.undelivered, [("untrusting".to_owned(), 2)], "{report:?}");
    // With it, both events went through TLS to the hub (twice over: the hub holds what the
    // trusting endpoint sent; the untrusting one sent nothing).
    let partitions = read_hub(&stack, "twins").await;
    let ids: Vec<String> =
        partitions.values().flatten().map(|e| string_property(e, "cloudEvents:id").unwrap()).collect();
    let sent: Vec<String> =
        batch.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, sent);
    assert!(sessions.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the events came over TLS");
}
