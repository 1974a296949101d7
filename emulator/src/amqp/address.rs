//! Addresses as clients write them: link source/target addresses and CBS audiences.
//!
//! Clients use full URLs (`amqps://<ns>/<hub>/Partitions/1`, `sb://<ns>/<queue>`,
//! `sb://127.0.0.1:5672/<hub>` from emulator connection strings) or bare paths (`<queue>`,
//! `<topic>/Subscriptions/<sub>`, `$cbs`). Only the host (to pick a namespace) and the path
//! segments matter; the scheme and the port are ignored.

/// A parsed address: the host, if the address was a URL, and the path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Address {
    /// Lower-cased host without port, when the address was a URL.
    pub host: Option<String>,
    /// Non-empty path segments, in their original case.
    pub segments: Vec<String>,
}

impl Address {
    pub fn parse(address: &str) -> Address {
        let address = address.trim();
        let (host, path) = match address.split_once("://") {
            Some((_scheme, rest)) => {
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                // `user@host:port`: neither the user nor the port picks a namespace.
                let authority = authority.rsplit('@').next().unwrap_or(authority);
                let host = strip_port(authority).to_ascii_lowercase();
                (Some(host).filter(|h| !h.is_empty()), path)
            }
            None => (None, address),
        };
        let path = path.split(['?', '#']).next().unwrap_or("");
        let segments = path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        Address { host, segments }
    }

    /// The segments lower-cased, for comparisons (entity names are case-insensitive in Azure).
    pub fn lowered(&self) -> Vec<String> {
        self.segments.iter().map(|s| s.to_ascii_lowercase()).collect()
    }

    /// The entity as error descriptions name it: `sb://<namespace>/<path>`.
    pub fn label(&self, namespace: &str) -> String {
        format!("sb://{namespace}/{}", self.segments.join("/"))
    }
}

/// `host:port` → `host`; IPv6 literals in brackets keep their brackets.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_once(']').map_or(authority, |(h, _)| &authority[..h.len() + 1]);
    }
    authority.split_once(':').map_or(authority, |(h, _)| h)
}

/// Percent-decoding as in URLs (`+` stays a plus: SAS signatures are base64).
pub(crate) fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or_else(|| format!("truncated escape at byte {i}"))?;
            let byte = u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape %{hex}"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "escapes do not decode to UTF-8".to_owned())
}

/// The comparable form of a resource URI: scheme dropped, host lower-cased with its port kept,
/// path segments lower-cased, e.g. `contoso.servicebus.windows.net/twins`.
pub(crate) fn resource_key(uri: &str) -> String {
    let uri = uri.trim();
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let mut parts = rest.split('/').filter(|s| !s.is_empty()).map(|s| s.to_ascii_lowercase());
    let mut key = parts.next().unwrap_or_default();
    for part in parts {
        key.push('/');
        key.push_str(&part);
    }
    key
}

/// Whether a SAS token's resource (`sr`) covers `audience`: same host and a segment-wise prefix
/// of its path, ignoring the scheme and case (`sb://ns/` covers `amqps://ns/hub/Partitions/0`).
pub(crate) fn resource_covers(sr: &str, audience: &str) -> bool {
    let (sr, audience) = (resource_key(sr), resource_key(audience));
    audience == sr || audience.starts_with(&format!("{sr}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(a: &Address) -> Vec<&str> {
        a.segments.iter().map(String::as_str).collect()
    }

    #[test]
    fn parses_urls_and_bare_paths() {
        let a = Address::parse("amqps://Contoso.servicebus.windows.net/twins/Partitions/1");
        assert_eq!(a.host.as_deref(), Some("contoso.servicebus.windows.net"));
        assert_eq!(segs(&a), ["twins", "Partitions", "1"]);

        let a = Address::parse("sb://127.0.0.1:5672/hub");
        assert_eq!(a.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(segs(&a), ["hub"]);

        let a = Address::parse("twin-topic/Subscriptions/all");
        assert_eq!(a.host, None);
        assert_eq!(segs(&a), ["twin-topic", "Subscriptions", "all"]);
        assert_eq!(a.lowered(), ["twin-topic", "subscriptions", "all"]);

        assert_eq!(segs(&Address::parse("/$cbs")), ["$cbs"]);
        assert_eq!(segs(&Address::parse("amqps://ns/")), Vec::<&str>::new());
        assert_eq!(Address::parse("amqps://[::1]:5671/q").host.as_deref(), Some("[::1]"));
        assert_eq!(Address::parse("amqps://key@ns:1/q").host.as_deref(), Some("ns"));
        assert_eq!(segs(&Address::parse("amqps://ns/q?x=1")), ["q"]);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("sb%3a%2f%2fns%2FQ").unwrap(), "sb://ns/Q");
        assert_eq!(percent_decode("a+b%2B").unwrap(), "a+b+");
        assert!(percent_decode("%2").is_err());
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%ff").is_err());
    }

    #[test]
    fn resource_coverage() {
        assert!(resource_covers("sb://ns.servicebus.windows.net/", "amqps://NS.servicebus.windows.net/hub"));
        assert!(resource_covers("https://ns/hub", "amqps://ns/hub/Partitions/0"));
        assert!(resource_covers("sb://ns/hub", "sb://ns/hub"));
        assert!(!resource_covers("sb://ns/hub", "sb://ns/hub2"));
        assert!(!resource_covers("sb://ns/hub", "sb://other/hub"));
        assert!(!resource_covers("sb://ns:1/hub", "sb://ns:2/hub"));
    }
}
