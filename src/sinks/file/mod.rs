//! The `File` endpoint: appends each event as one line of structured CloudEvents JSON (NDJSON),
//! the form it would have on the wire. Useful for audits, replays (`twinroute run --input`) and
//! local development.

use super::{ndjson_lines, DeliveryOutcome, Sink};
use crate::delivery::Envelope;
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Appends NDJSON to one file.
pub struct FileSink {
    path: PathBuf,
    /// One writer at a time keeps lines whole; the delivery worker is the only caller anyway.
    file: Mutex<tokio::fs::File>,
}

impl FileSink {
    /// Opens (creating if needed) the file for appending, creating missing parent directories.
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await?;
        }
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn deliver(&self, batch: &[Arc<Envelope>]) -> DeliveryOutcome {
        let bytes = ndjson_lines(batch);
        let mut file = self.file.lock().await;
        match file.write_all(&bytes).await {
            // `write_all` on a tokio file hands the bytes to a blocking thread; flushing waits
            // until they reached the OS, so "delivered" means the kernel has them.
            Ok(()) => match file.flush().await {
                Ok(()) => DeliveryOutcome::Delivered,
                Err(e) => transient(&self.path, e),
            },
            Err(e) => transient(&self.path, e),
        }
    }

    async fn flush(&self) -> std::io::Result<()> {
        let mut file = self.file.lock().await;
        file.flush().await?;
        match file.sync_data().await {
            // Devices, pipes and FIFOs (`/dev/null`, `/dev/stdout`) cannot be synced: nothing
            // to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput && !file.metadata().await?.is_file() => {
                Ok(())
            }
            other => other,
        }
    }
}

/// A full disk or a permissions change can be fixed by an operator: retry rather than give up.
fn transient(path: &Path, e: std::io::Error) -> DeliveryOutcome {
    DeliveryOutcome::Transient { reason: format!("writing {}: {e}", path.display()), after: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_structured;

    #[tokio::test]
    async fn appends_one_structured_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.ndjson");
        let sink = FileSink::open(&path).await.unwrap();
        let event =
            parse_structured(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":1}}"#)
                .unwrap();
        let batch = vec![Arc::new(Envelope::new(event.clone())), Arc::new(Envelope::new(event))];
        assert_eq!(sink.deliver(&batch).await, DeliveryOutcome::Delivered);
        assert_eq!(sink.deliver(&batch[..1]).await, DeliveryOutcome::Delivered);
        sink.flush().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines
            .iter()
            .all(|l| *l == r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":1}}"#));
    }

    #[tokio::test]
    async fn a_device_that_cannot_be_synced_closes_cleanly() {
        let sink = FileSink::open(Path::new("/dev/null")).await.unwrap();
        let event = parse_structured(br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#).unwrap();
        assert_eq!(sink.deliver(&[Arc::new(Envelope::new(event))]).await, DeliveryOutcome::Delivered);
        sink.flush().await.expect("closing on /dev/null is not an error");
    }
}
