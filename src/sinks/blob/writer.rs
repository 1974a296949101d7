//! The one service doing Blob IO: writes, lists, reads and deletes blobs of one container, and
//! classifies every failure as the delivery engine needs it. The Blob sink and the dead-letter
//! store (writing, and later replaying) both use it.

use crate::identity::{provider::required_role, AUDIENCE_STORAGE};
use crate::sinks::{http, DeliveryOutcome};
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::headers::HeaderName;
use azure_core::http::{ClientOptions, RequestContent, RetryOptions, Transport};
use azure_storage_blob::models::{BlobClientUploadOptions, BlobContainerClientListBlobsOptions};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use futures::TryStreamExt as _;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why a Blob operation failed, classified the way [`DeliveryOutcome`] is. Messages name the
/// container (never its SAS) and say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The service refused the credentials (a missing role, a token for another audience, an
    /// expired or read-only SAS).
    #[error("{0}")]
    Auth(String),
    /// Retrying cannot help (the container does not exist, a bad request, a blob too large).
    #[error("{0}")]
    Permanent(String),
    /// Worth trying again, optionally no sooner than `after` (the service's hint).
    #[error("{reason}")]
    Transient { reason: String, after: Option<Duration> },
}

impl BlobError {
    /// The delivery outcome this failure means.
    pub fn into_outcome(self) -> DeliveryOutcome {
        match self {
            BlobError::Auth(reason) => DeliveryOutcome::AuthFailure { reason },
            BlobError::Permanent(reason) => DeliveryOutcome::Permanent { reason },
            BlobError::Transient { reason, after } => DeliveryOutcome::Transient { reason, after },
        }
    }
}

/// A blob read back: what replaying a dead-lettered event needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub metadata: HashMap<String, String>,
}

/// How the writer authenticates, which decides what an authorization failure tells the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// A bearer token from a managed identity: a refusal means a missing role (or a token
    /// for the wrong audience).
    Identity,
    /// A container SAS carried in the URL query.
    Sas,
}

/// Blob operations on one container, over the Azure SDK with our HTTPS client.
pub struct BlobWriter {
    container: BlobContainerClient,
    /// The container URL without its query (the SAS), the only form that goes into messages.
    display_url: String,
    auth: Auth,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("container", &self.display_url)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// A writer for the container at `container_url`.
    ///
    /// With a `credential` (a managed identity) requests carry bearer tokens for Storage and the
    /// URL must be `https://`; without one, `container_url` must carry a container SAS in its
    /// query, which stays on the URL and never appears in a message. `ca_file` adds trusted CA
    /// certificates (PEM). The SDK does not retry: the delivery engine owns retries, so a failure
    /// is reported at once instead of after the SDK's own minute of backoff.
    pub fn new(
        container_url: &url::Url,
        credential: Option<Arc<dyn TokenCredential>>,
        ca_file: Option<&Path>,
    ) -> Result<BlobWriter, String> {
        let display_url = http::redact_url(container_url);
        let auth = if credential.is_some() { Auth::Identity } else { Auth::Sas };
        if auth == Auth::Sas && !container_url.query_pairs().any(|(k, _)| k == "sig") {
            return Err(format!(
                "container {display_url}: without a managed identity the URL must be a container SAS URL (with sig=)"
            ));
        }
        if auth == Auth::Identity && container_url.scheme() != "https" {
            return Err(format!(
                "container {display_url}: bearer tokens are only sent over https; use an https:// URL"
            ));
        }
        let client = http::client(ca_file)?;
        let client_options = ClientOptions {
            transport: Some(Transport::new(Arc::new(client))),
            retry: RetryOptions::none(),
            ..Default::default()
        };
        let container = BlobContainerClient::new(
            container_url.clone(),
            credential,
            Some(BlobContainerClientOptions { client_options, ..Default::default() }),
        )
        .map_err(|e| format!("container {display_url}: {}", http::error_chain(&e)))?;
        Ok(BlobWriter { container, display_url, auth })
    }

    /// The container URL without its query, for messages and logs.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// Writes (creates or overwrites) the block blob `name`.
    ///
    /// Metadata names must be valid C# identifiers (Azure's rule) and values ASCII.
    pub async fn put(
        &self,
        name: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(&str, String)],
    ) -> DeliveryOutcome {
        match self.try_put(name, body, content_type, metadata).await {
            Ok(()) => DeliveryOutcome::Delivered,
            Err(e) => e.into_outcome(),
        }
    }

    /// [`BlobWriter::put`] as a `Result`.
    pub async fn try_put(
        &self,
        name: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(&str, String)],
    ) -> Result<(), BlobError> {
        let options = BlobClientUploadOptions {
            blob_content_type: Some(content_type.to_owned()),
            metadata: (!metadata.is_empty())
                .then(|| metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()),
            ..Default::default()
        };
        self.container
            .blob_client(name)
            .upload(RequestContent::from(body), Some(options))
            .await
            .map(drop)
            .map_err(|e| self.classify(&e, "write", Some(name)))
    }

    /// Names of the blobs whose names start with `prefix` (all pages), in the service's order
    /// (lexicographic).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            ..Default::default()
        };
        let mut pages = self
            .container
            .list_blobs(Some(options))
            .map_err(|e| self.classify(&e, "list", None))?
            .into_pages();
        let mut names = Vec::new();
        while let Some(page) = pages.try_next().await.map_err(|e| self.classify(&e, "list", None))? {
            let page = page.into_model().map_err(|e| self.classify(&e, "list", None))?;
            names.extend(page.blob_items.into_iter().filter_map(|item| item.name));
        }
        Ok(names)
    }

    /// Reads the blob `name`; `None` when it does not exist (e.g. another replica replayed and
    /// deleted it).
    pub async fn get(&self, name: &str) -> Result<Option<StoredBlob>, BlobError> {
        let result = match self.container.blob_client(name).download(None).await {
            Ok(result) => result,
            Err(e) if is_blob_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.classify(&e, "read", Some(name))),
        };
        let content_type = result.properties.content_type.clone();
        let metadata = result.properties.metadata.clone();
        let body = result.body.collect().await.map_err(|e| self.classify(&e, "read", Some(name)))?;
        Ok(Some(StoredBlob { body: body.to_vec(), content_type, metadata }))
    }

    /// Deletes the blob `name`; `false` when it did not exist.
    pub async fn delete(&self, name: &str) -> Result<bool, BlobError> {
        match self.container.blob_client(name).delete(None).await {
            Ok(_) => Ok(true),
            Err(e) if is_blob_not_found(&e) => Ok(false),
            Err(e) => Err(self.classify(&e, "delete", Some(name))),
        }
    }

    /// Classifies an SDK error. `operation` and `blob` say what was attempted, for the message.
    fn classify(&self, error: &azure_core::Error, operation: &str, blob: Option<&str>) -> BlobError {
        let container = &self.display_url;
        let what = match blob {
            Some(name) => format!("could not {operation} blob {name} in container {container}"),
            None => format!("could not {operation} blobs of container {container}"),
        };
        match error.kind() {
            ErrorKind::HttpResponse { status, error_code, raw_response } => {
                let status = u16::from(*status);
                let code = error_code.as_deref().unwrap_or("");
                let after = raw_response.as_ref().and_then(|r| {
                    let headers = r.headers();
                    http::retry_after(|name| headers.get_optional_str(&HeaderName::from(name.to_owned())))
                });
                classify_status(status, code, after, &what, container, self.auth)
            }
            ErrorKind::Credential => BlobError::Auth(format!(
                "{what}: no token for Azure Storage could be had for the managed identity: {}",
                http::error_chain(error)
            )),
            ErrorKind::Connection | ErrorKind::Io => {
                let cause = http::error_chain(error);
                let hint = http::tls_hint(&cause);
                BlobError::Transient { reason: format!("{what}: {cause}{hint}"), after: None }
            }
            // Unknown failures are retried rather than dropped: an event is never lost to a
            // classification we did not foresee.
            _ => {
                BlobError::Transient { reason: format!("{what}: {}", http::error_chain(error)), after: None }
            }
        }
    }
}

/// The classification of an HTTP status and Storage error code (`x-ms-error-code`).
fn classify_status(
    status: u16,
    code: &str,
    after: Option<Duration>,
    what: &str,
    container: &str,
    auth: Auth,
) -> BlobError {
    let code_text = if code.is_empty() { String::new() } else { format!(", {code}") };
    match status {
        401 | 403 => BlobError::Auth(match auth {
            Auth::Identity => format!(
                "{what}: access denied ({status}{code_text}): the managed identity needs the \
                 {} role on container {container} (or its storage account), and its token \
                 must be for {AUDIENCE_STORAGE}",
                required_role(AUDIENCE_STORAGE)
            ),
            Auth::Sas => format!(
                "{what}: access denied ({status}{code_text}): the SAS was refused (expired or lacking \
                 write permission); issue a new container SAS with read, create, write, delete and \
                 list permissions"
            ),
        }),
        404 if code == "ContainerNotFound" => {
            BlobError::Permanent(format!("{what}: container {container} does not exist: create it"))
        }
        404 => BlobError::Permanent(format!(
            "{what}: not found (404{code_text}): check the storage account and container in the URL"
        )),
        408 | 429 | 500..=599 => BlobError::Transient {
            reason: format!("{what}: the service answered {status}{code_text}"),
            after,
        },
        // 409: the container is being deleted or a lease is held; both can pass.
        409 => BlobError::Transient { reason: format!("{what}: conflict (409{code_text})"), after },
        413 => BlobError::Permanent(format!("{what}: the blob is too large (413{code_text})")),
        _ => BlobError::Permanent(format!("{what}: the service refused the request ({status}{code_text})")),
    }
}

fn is_blob_not_found(error: &azure_core::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::HttpResponse { status, error_code, .. }
            if u16::from(*status) == 404 && error_code.as_deref() == Some("BlobNotFound")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "https://acct.blob.core.windows.net/dl";

    fn classify(status: u16, code: &str, auth: Auth) -> BlobError {
        classify_status(status, code, Some(Duration::from_secs(3)), "could not write blob b", C, auth)
    }

    #[test]
    fn statuses_are_classified() {
        let BlobError::Auth(m) = classify(403, "AuthorizationPermissionMismatch", Auth::Identity) else {
            panic!()
        };
        assert!(m.contains("Storage Blob Data Contributor") && m.contains(C), "{m}");
        let BlobError::Auth(m) = classify(403, "AuthenticationFailed", Auth::Sas) else { panic!() };
        assert!(m.contains("the SAS was refused (expired or lacking write permission)"), "{m}");
        let BlobError::Permanent(m) = classify(404, "ContainerNotFound", Auth::Sas) else { panic!() };
        assert!(m.contains(&format!("container {C} does not exist: create it")), "{m}");
        assert!(matches!(classify(400, "InvalidHeaderValue", Auth::Sas), BlobError::Permanent(_)));
        assert!(matches!(classify(413, "RequestBodyTooLarge", Auth::Sas), BlobError::Permanent(_)));
        for status in [408, 429, 500, 503] {
            assert_eq!(
                classify(status, "ServerBusy", Auth::Sas),
                BlobError::Transient {
                    reason: format!("could not write blob b: the service answered {status}, ServerBusy"),
                    after: Some(Duration::from_secs(3)),
                }
            );
        }
    }

    #[test]
    fn a_sas_url_is_required_without_an_identity_and_never_shown() {
        let url = url::Url::parse("https://acct.blob.core.windows.net/dl?sv=1&se=2").unwrap();
        let e = BlobWriter::new(&url, None, None).unwrap_err();
        assert!(e.contains("SAS URL") && !e.contains("sv=1"), "{e}");
        let url = url::Url::parse("https://acct.blob.core.windows.net/dl?sv=1&sig=SECRET").unwrap();
        let writer = BlobWriter::new(&url, None, None).unwrap();
        assert_eq!(writer.display_url(), "https://acct.blob.core.windows.net/dl");
        assert!(!format!("{writer:?}").contains("SECRET"));
    }
}
