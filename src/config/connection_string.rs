//! Event Hubs / Service Bus connection strings:
//! `Endpoint=sb://<ns>.servicebus.windows.net/;SharedAccessKeyName=<rule>;SharedAccessKey=<key>;EntityPath=<entity>`.

use super::Secret;
use std::fmt;

/// A parsed connection string. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The namespace URI as given (`sb://<ns>.servicebus.windows.net/`).
    pub endpoint: url::Url,
    /// The fully qualified namespace host (`<ns>.servicebus.windows.net`).
    pub namespace: String,
    pub key_name: String,
    pub key: Secret,
    pub entity_path: Option<String>,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("endpoint", &self.endpoint.as_str())
            .field("key_name", &self.key_name)
            .field("key", &self.key)
            .field("entity_path", &self.entity_path)
            .finish()
    }
}

impl ConnectionString {
    /// Parses a connection string. Errors name the missing or malformed part and never repeat
    /// the string (it holds a key).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut entity_path = None;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err("connection string: each part must be Name=Value, separated by ';'".into());
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.trim()),
                "sharedaccesskeyname" => key_name = Some(v.trim()),
                "sharedaccesskey" => key = Some(v.trim()),
                "entitypath" => entity_path = Some(v.trim()),
                // Other parts (UseDevelopmentEmulator, ...) are accepted and ignored.
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or("connection string: Endpoint=sb://<namespace>/ is missing")?;
        let endpoint = url::Url::parse(endpoint)
            .map_err(|e| format!("connection string: Endpoint is not a URL ({e})"))?;
        let namespace = endpoint
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("connection string: Endpoint has no host name")?
            .to_owned();
        let key_name = key_name.ok_or("connection string: SharedAccessKeyName is missing")?.to_owned();
        let key = key.filter(|k| !k.is_empty()).ok_or("connection string: SharedAccessKey is missing")?;
        Ok(Self {
            endpoint,
            namespace,
            key_name,
            key: Secret::new(key),
            entity_path: entity_path.filter(|e| !e.is_empty()).map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_portal_connection_string() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc+/=;EntityPath=twins",
        )
        .unwrap();
        assert_eq!(cs.namespace, "contoso.servicebus.windows.net");
        assert_eq!(cs.key_name, "send");
        assert_eq!(cs.key.expose(), "abc+/=");
        assert_eq!(cs.entity_path.as_deref(), Some("twins"));
        assert!(!format!("{cs:?}").contains("abc+/="));
    }

    #[test]
    fn errors_name_the_part_and_hide_the_key() {
        let err = ConnectionString::parse("SharedAccessKeyName=send;SharedAccessKey=topsecret").unwrap_err();
        assert!(err.contains("Endpoint"), "{err}");
        assert!(!err.contains("topsecret"));
        let err = ConnectionString::parse("Endpoint=sb://ns/;SharedAccessKey=topsecret").unwrap_err();
        assert!(err.contains("SharedAccessKeyName") && !err.contains("topsecret"), "{err}");
        assert!(ConnectionString::parse("garbage").is_err());
    }
}
