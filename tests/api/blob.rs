//! The Blob sink and writer against Azurite over HTTPS (started by `./scripts/test`, which sets
//! `TEST_AZURITE_BLOB` and `TEST_AZURITE_CA`), with managed-identity tokens
//! from the IMDS stand-in and with container SAS URLs signed here with Azurite's well-known key.

use crate::helpers::{telemetry, twin_create};
use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use base64::Engine as _;
use futures::TryStreamExt as _;
use hmac::{Hmac, Mac};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use time::macros::datetime;
use time::OffsetDateTime;
use twinroute::config::{EndpointConfig, EndpointSpec, EndpointTarget, Secret};
use twinroute::delivery::Envelope;
use twinroute::event::parse_structured;
use twinroute::identity::{ImdsOptions, ManagedIdentityId};
use twinroute::sinks::blob::{blob_name, BlobSink, BlobWriter, CONTENT_TYPE_JSON, CONTENT_TYPE_NDJSON};
use twinroute::sinks::{ndjson_lines, DeliveryOutcome, Sink};
use twinroute_emulator::imds::{ImdsConfig, ImdsStandIn, DEFAULT_TENANT_ID};
use twinroute_emulator::jwt;

/// Azurite's well-known development account and key (public; Azurite accepts nothing else).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The service version the test SAS tokens are signed for (string-to-sign of 2020-12-06 and later).
const SAS_VERSION: &str = "2022-11-02";

/// Where Azurite runs and the CA its certificate chains to.
pub(crate) struct Azurite {
    pub(crate) blob: String,
    pub(crate) ca: PathBuf,
}

pub(crate) fn azurite() -> Azurite {
    let (Ok(blob), Ok(ca)) = (std::env::var("TEST_AZURITE_BLOB"), std::env::var("TEST_AZURITE_CA")) else {
        panic!(
            "TEST_AZURITE_BLOB and TEST_AZURITE_CA are not set: the Blob tests need \
             Azurite; run ./scripts/test (it installs and starts Azurite, then runs every test), or \
             `eval \"$(scripts/azurite start)\"` before cargo test"
        );
    };
    Azurite { blob: blob.trim_end_matches('/').to_owned(), ca: PathBuf::from(ca) }
}

/// A container name no other test uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A managed-identity credential from a fresh IMDS stand-in (kept alive with it).
pub(crate) async fn identity() -> (ImdsStandIn, Arc<dyn TokenCredential>) {
    let imds = ImdsStandIn::start(ImdsConfig::default()).await.unwrap();
    let options = ImdsOptions::new(imds.token_url().parse().unwrap(), ManagedIdentityId::SystemAssigned);
    (imds, Arc::new(options.credential()))
}

/// The SDK client tests set up and read back with (identity auth, the test CA, no retries).
fn admin_client(az: &Azurite, container: &str, credential: Arc<dyn TokenCredential>) -> BlobContainerClient {
    let http = twinroute::sinks::http::client(Some(&az.ca)).unwrap();
    let options = BlobContainerClientOptions {
        client_options: ClientOptions {
            transport: Some(Transport::new(Arc::new(http))),
            retry: RetryOptions::none(),
            ..Default::default()
        },
        ..Default::default()
    };
    let url = url::Url::parse(&format!("{}/{container}", az.blob)).unwrap();
    BlobContainerClient::new(url, Some(credential), Some(options)).unwrap()
}

/// Creates a container and returns the client for it.
pub(crate) async fn create_container(
    az: &Azurite,
    container: &str,
    credential: Arc<dyn TokenCredential>,
) -> BlobContainerClient {
    let client = admin_client(az, container, credential);
    client.create(None).await.expect("creating the test container");
    client
}

/// Every blob of a container: name -> (body, content type), read with the SDK.
pub(crate) async fn read_back(client: &BlobContainerClient) -> BTreeMap<String, (Vec<u8>, Option<String>)> {
    let mut pages = client.list_blobs(None).unwrap().into_pages();
    let mut out = BTreeMap::new();
    while let Some(page) = pages.try_next().await.unwrap() {
        for item in page.into_model().unwrap().blob_items {
            let name = item.name.unwrap();
            let download = client.blob_client(&name).download(None).await.unwrap();
            let content_type = download.properties.content_type.clone();
            let body = download.body.collect().await.unwrap().to_vec();
            out.insert(name, (body, content_type));
        }
    }
    out
}

/// A service SAS for a container (`sr=c`), signed with the account key: the query string.
pub(crate) fn container_sas(container: &str, permissions: &str, expiry: OffsetDateTime) -> String {
    let expiry =
        expiry.replace_nanosecond(0).unwrap().format(&time::format_description::well_known::Rfc3339).unwrap();
    // The string-to-sign of service SAS versions 2020-12-06 and later: permissions, start, expiry,
    // canonicalized resource, identifier, IP, protocol, version, resource, snapshot time,
    // encryption scope, then the five response-header overrides (rscc, rscd, rsce, rscl, rsct).
    let string_to_sign = [
        permissions,
        "",
        &expiry,
        &format!("/blob/{ACCOUNT}/{container}"),
        "",
        "",
        "",
        SAS_VERSION,
        "c",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ]
    .join("\n");
    let key = base64::engine::general_purpose::STANDARD.decode(ACCOUNT_KEY).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(string_to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("sv", SAS_VERSION);
    query.append_pair("sr", "c");
    query.append_pair("sp", permissions);
    query.append_pair("se", &expiry);
    query.append_pair("sig", &sig);
    query.finish()
}

pub(crate) fn in_an_hour() -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::hours(1)
}

fn identity_endpoint(az: &Azurite, name: &str, container: &str, ca: bool) -> EndpointConfig {
    let spec = EndpointSpec {
        endpoint_type: Some("Blob".into()),
        authentication_type: Some("IdentityBased".into()),
        container_url: Some(format!("{}/{container}", az.blob)),
        ..Default::default()
    };
    finish(spec.validate(name).unwrap(), ca.then(|| az.ca.clone()), false)
}

fn sas_endpoint(az: &Azurite, name: &str, container: &str, sas: &str, ndjson: bool) -> EndpointConfig {
    let spec = EndpointSpec {
        endpoint_type: Some("Blob".into()),
        container_sas_url: Some(Secret::new(format!("{}/{container}?{sas}", az.blob))),
        ..Default::default()
    };
    finish(spec.validate(name).unwrap(), Some(az.ca.clone()), ndjson)
}

/// Sets `ca_file` and the NDJSON format on a checked endpoint (as `ca_file = ...` and
/// `format = "ndjson"` in its spec would).
fn finish(mut endpoint: EndpointConfig, ca_file: Option<PathBuf>, ndjson: bool) -> EndpointConfig {
    endpoint.spec.ca_file = ca_file.as_ref().map(|p| p.display().to_string());
    endpoint.ca_file = ca_file;
    if ndjson {
        endpoint.spec.format = Some("ndjson".into());
        if let EndpointTarget::Blob { format, .. } = &mut endpoint.target {
            *format = twinroute::config::BlobFormat::Ndjson;
        }
    }
    endpoint
}

/// An envelope accepted at `at`.
fn envelope(event: serde_json::Value, at: OffsetDateTime) -> Arc<Envelope> {
    let mut envelope = Envelope::new(parse_structured(event.to_string().as_bytes()).unwrap());
    envelope.accepted_at = at;
    Arc::new(envelope)
}

/// A token Azurite's claim checks refuse: it is for Event Hubs, not Storage.
#[derive(Debug)]
struct WrongAudience;

#[async_trait]
impl TokenCredential for WrongAudience {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = jwt::Claims {
            aud: "https://eventhubs.azure.net/".into(),
            iss: format!("https://sts.windows.net/{DEFAULT_TENANT_ID}/"),
            iat: now - 60,
            nbf: now - 60,
            exp: now + 3600,
            appid: "00000000-0000-4000-8000-00000000c001".into(),
            oid: "00000000-0000-4000-8000-00000000b001".into(),
            sub: "00000000-0000-4000-8000-00000000b001".into(),
            tid: DEFAULT_TENANT_ID.into(),
            xms_mirid: None,
        };
        let token = jwt::issue(&claims, twinroute_emulator::DEV_SIGNING_KEY);
        Ok(AccessToken::new(token, OffsetDateTime::now_utc() + time::Duration::hours(1)))
    }
}

#[tokio::test]
async fn identity_based_json_writes_one_blob_per_event_named_by_the_hour_accepted() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    let container = unique("events");
    let admin = create_container(&az, &container, credential.clone()).await;
    let sink =
        BlobSink::new(&identity_endpoint(&az, "blob-out", &container, true), Some(credential)).unwrap();

    let at = datetime!(2024-03-05 07:08:09.123 UTC);
    let mut awkward = twin_create("room/1");
    awkward["id"] = "msg/1?x#y %".into();
    let batch = vec![
        envelope(twin_create("room-1"), at),
        envelope(telemetry("thermo-7", 21.5), datetime!(2024-12-31 23:59:59 +00:00)),
        envelope(awkward, at),
    ];
    assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);

    let expected: BTreeMap<String, (Vec<u8>, Option<String>)> = batch
        .iter()
        .map(|e| {
            (
                blob_name("blob-out", e.accepted_at, e.event.id(), "json"),
                (e.event.to_structured_json(), Some(CONTENT_TYPE_JSON.to_owned())),
            )
        })
        .collect();
    let names: Vec<&String> = expected.keys().collect();
    assert!(names.contains(&&format!("blob-out/2024/03/05/07/{}.json", batch[0].event.id())), "{names:?}");
    assert!(names.contains(&&format!("blob-out/2024/12/31/23/{}.json", batch[1].event.id())), "{names:?}");
    assert!(names.contains(&&"blob-out/2024/03/05/07/msg%2F1%3Fx%23y%20%25.json".to_owned()), "{names:?}");
    assert_eq!(read_back(&admin).await, expected);

    // Delivering the same batch again rewrites the same blobs: nothing is duplicated.
    assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);
    assert_eq!(read_back(&admin).await, expected);
}

#[tokio::test]
async fn sas_based_json_and_ndjson() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    let container = unique("sas");
    let admin = create_container(&az, &container, credential).await;
    let sas = container_sas(&container, "rcwdl", in_an_hour());
    let at = datetime!(2025-01-02 03:04:05 UTC);
    let batch =
        vec![envelope(twin_create("a"), at), envelope(twin_create("b"), at + time::Duration::hours(2))];

    let json = BlobSink::new(&sas_endpoint(&az, "json-out", &container, &sas, false), None).unwrap();
    assert_eq!(json.deliver(&batch).await, DeliveryOutcome::Delivered);
    let ndjson = BlobSink::new(&sas_endpoint(&az, "lines-out", &container, &sas, true), None).unwrap();
    assert_eq!(ndjson.deliver(&batch).await, DeliveryOutcome::Delivered);

    let blobs = read_back(&admin).await;
    let id = |i: usize| batch[i].event.id().to_owned();
    let expected = BTreeMap::from([
        (
            format!("json-out/2025/01/02/03/{}.json", id(0)),
            (batch[0].event.to_structured_json(), Some(CONTENT_TYPE_JSON.to_owned())),
        ),
        (
            format!("json-out/2025/01/02/05/{}.json", id(1)),
            (batch[1].event.to_structured_json(), Some(CONTENT_TYPE_JSON.to_owned())),
        ),
        // One blob for the batch, named after its first event and the hour it was accepted.
        (
            format!("lines-out/2025/01/02/03/{}.ndjson", id(0)),
            (ndjson_lines(&batch), Some(CONTENT_TYPE_NDJSON.to_owned())),
        ),
    ]);
    assert_eq!(blobs, expected);
}

#[tokio::test]
async fn a_missing_container_is_permanent() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    let container = unique("missing");
    let sink =
        BlobSink::new(&identity_endpoint(&az, "blob-out", &container, true), Some(credential)).unwrap();
    let outcome = sink.deliver(&[envelope(twin_create("a"), OffsetDateTime::now_utc())]).await;
    let DeliveryOutcome::Permanent { reason } = outcome else { panic!("{outcome:?}") };
    assert!(
        reason.contains(&format!("container {}/{container} does not exist: create it", az.blob)),
        "{reason}"
    );
}

#[tokio::test]
async fn a_token_for_another_audience_is_an_auth_failure_naming_container_and_role() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    let container = unique("audience");
    create_container(&az, &container, credential).await;
    let sink =
        BlobSink::new(&identity_endpoint(&az, "blob-out", &container, true), Some(Arc::new(WrongAudience)))
            .unwrap();
    let outcome = sink.deliver(&[envelope(twin_create("a"), OffsetDateTime::now_utc())]).await;
    let DeliveryOutcome::AuthFailure { reason } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains(&format!("{}/{container}", az.blob)), "{reason}");
    assert!(reason.contains("Storage Blob Data Contributor"), "{reason}");
}

#[tokio::test]
async fn a_refused_sas_is_an_auth_failure_and_never_shown() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    let container = unique("expired");
    create_container(&az, &container, credential).await;
    let batch = [envelope(twin_create("a"), OffsetDateTime::now_utc())];
    for sas in [
        // Expired an hour ago.
        container_sas(&container, "rcwdl", OffsetDateTime::now_utc() - time::Duration::hours(1)),
        // Valid, but read and list only.
        container_sas(&container, "rl", in_an_hour()),
    ] {
        let sink = BlobSink::new(&sas_endpoint(&az, "blob-out", &container, &sas, false), None).unwrap();
        let outcome = sink.deliver(&batch).await;
        let DeliveryOutcome::AuthFailure { reason } = &outcome else { panic!("{outcome:?}") };
        assert!(reason.contains(&format!("container {}/{container}", az.blob)), "{reason}");
        assert!(reason.contains("the SAS was refused (expired or lacking write permission)"), "{reason}");
        let sig =
            url::form_urlencoded::parse(sas.as_bytes()).find(|(k, _)| k == "sig").unwrap().1.into_owned();
        for secret in [sas.as_str(), sig.as_str(), "sig=", "sv="] {
            assert!(!reason.contains(secret), "the SAS leaked into {reason}");
            assert!(!format!("{sink:?}").contains(secret));
        }
    }
}

#[tokio::test]
async fn an_untrusted_certificate_fails_fast_with_a_hint() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    // No ca_file: Azurite's certificate chains to a CA nobody trusts.
    let sink =
        BlobSink::new(&identity_endpoint(&az, "blob-out", &unique("tls"), false), Some(credential)).unwrap();
    let batch = [envelope(twin_create("a"), OffsetDateTime::now_utc())];
    // A guard, not a measurement: with the SDK's default retries this took about 80 s.
    let outcome = tokio::time::timeout(Duration::from_secs(30), sink.deliver(&batch))
        .await
        .expect("a TLS failure is reported at once, not after the SDK's retries");
    let DeliveryOutcome::Transient { reason, .. } = outcome else { panic!("{outcome:?}") };
    assert!(reason.contains("certificate"), "{reason}");
    assert!(reason.contains("set ca_file"), "{reason}");
}

#[tokio::test]
async fn the_writer_lists_reads_and_deletes_for_replay() {
    let az = azurite();
    let (_imds, credential) = identity().await;
    let container = unique("replay");
    create_container(&az, &container, credential).await;
    let sas = container_sas(&container, "rcwdl", in_an_hour());
    let url = url::Url::parse(&format!("{}/{container}?{sas}", az.blob)).unwrap();
    let writer = BlobWriter::new(&url, None, Some(&az.ca)).unwrap();
    assert!(!writer.display_url().contains("sig"));

    let at = datetime!(2024-06-01 10:00 UTC);
    let names: Vec<String> = ["b", "a", "c/d"].iter().map(|id| blob_name("dl", at, id, "json")).collect();
    for (i, name) in names.iter().enumerate() {
        let metadata = [("reason", "ttl".to_owned()), ("attempts", i.to_string())];
        let outcome =
            writer.put(name, format!("{{\"n\":{i}}}").into_bytes(), CONTENT_TYPE_JSON, &metadata).await;
        assert_eq!(outcome, DeliveryOutcome::Delivered);
    }
    let outcome = writer.put("other/x.json", b"{}".to_vec(), CONTENT_TYPE_JSON, &[]).await;
    assert_eq!(outcome, DeliveryOutcome::Delivered);

    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(writer.list("dl/2024/06/01/10/").await.unwrap(), sorted);
    assert_eq!(writer.list("").await.unwrap().len(), 4);
    assert!(writer.list("dl/2023/").await.unwrap().is_empty());

    let blob = writer.get(&names[2]).await.unwrap().expect("the blob exists");
    assert_eq!(blob.body, br#"{"n":2}"#);
    assert_eq!(blob.content_type.as_deref(), Some(CONTENT_TYPE_JSON));
    assert_eq!(blob.metadata.get("reason").map(String::as_str), Some("ttl"));
    assert_eq!(blob.metadata.get("attempts").map(String::as_str), Some("2"));
    assert_eq!(writer.get("dl/none.json").await.unwrap(), None);

    assert!(writer.delete(&names[0]).await.unwrap());
    assert!(!writer.delete(&names[0]).await.unwrap());
    assert_eq!(writer.list("dl/").await.unwrap().len(), 2);
}
