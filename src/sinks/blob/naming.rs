//! Blob names (pure): where an event, a batch or a dead-lettered event is stored.
//!
//! The layout is ADT's dead-letter path (spec §5), `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.<ext>`,
//! in UTC, zero-padded (both open in ADT; twinroute's choice). Names are deterministic: writing the
//! same event again writes the same blob, which makes re-delivery after a partial failure
//! idempotent.

use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use time::OffsetDateTime;

/// Encoded event ids longer than this are shortened (see [`safe_event_id`]): a blob name may be
/// at most 1,024 characters, and the endpoint, the date and the extension need some of them.
pub const MAX_EVENT_ID_LEN: usize = 900;

/// How much of a too-long encoded id is kept before its hash.
const KEPT_PREFIX_LEN: usize = 800;

/// `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.<ext>`, the hour of `at` in UTC, zero-padded,
/// with the event id made safe by [`safe_event_id`].
pub fn blob_name(endpoint: &str, at: OffsetDateTime, event_id: &str, ext: &str) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let id = safe_event_id(event_id);
    let mut name = String::with_capacity(endpoint.len() + 15 + id.len() + 1 + ext.len());
    // Writing into a String cannot fail.
    let _ = write!(
        name,
        "{endpoint}/{:04}/{:02}/{:02}/{:02}/{id}.{ext}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour()
    );
    name
}

/// The prefix of every blob an endpoint wrote in the hour of `at`: `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/`.
pub fn hour_prefix(endpoint: &str, at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!("{endpoint}/{:04}/{:02}/{:02}/{:02}/", at.year(), u8::from(at.month()), at.day(), at.hour())
}

/// An event id as one blob-name segment.
///
/// Rule: ASCII letters, digits and `-` `_` `.` `~` `:` `@` `+` `=` `,` `;` `!` `$` `(` `)` are
/// kept; every other byte of the id's UTF-8 (including `/`, `\`, `?`, `#`, `%`, `&`, spaces,
/// quotes, control characters and all non-ASCII) becomes `%XX` (upper-case hex). So an id never
/// adds a path level, never ends a name in a way storage tools mangle, and distinct ids keep
/// distinct names (encoding `%` itself makes the mapping reversible). UUIDs and the usual
/// telemetry message ids are unchanged.
///
/// An encoded id longer than [`MAX_EVENT_ID_LEN`] keeps its first 800 characters followed by
/// `~` and the SHA-256 of the original id in hex, so the name stays within Azure's 1,024-character
/// limit and still identifies the event.
pub fn safe_event_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:@+=,;!$()".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.len() > MAX_EVENT_ID_LEN {
        // Cut on a whole character of the encoded form (never inside a %XX triple).
        let mut cut = KEPT_PREFIX_LEN;
        while out.as_bytes()[..cut].iter().rev().take(2).any(|&b| b == b'%') {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('~');
        for byte in Sha256::digest(id.as_bytes()) {
            let _ = write!(out, "{byte:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn names_are_utc_and_zero_padded() {
        let at = datetime!(2024-03-05 07:08:09 +02:00);
        assert_eq!(
            blob_name("twin-dl", at, "6ccdb1cd-0dc3-450f-8730-ceccda8439be", "json"),
            "twin-dl/2024/03/05/05/6ccdb1cd-0dc3-450f-8730-ceccda8439be.json"
        );
        let midnight = datetime!(2024-01-01 01:30 +03:00);
        assert_eq!(blob_name("e", midnight, "x", "ndjson"), "e/2023/12/31/22/x.ndjson");
        assert_eq!(hour_prefix("e", midnight), "e/2023/12/31/22/");
    }

    #[test]
    fn awkward_ids_are_encoded() {
        assert_eq!(safe_event_id("a/b\\c?d#e%f g"), "a%2Fb%5Cc%3Fd%23e%25f%20g");
        assert_eq!(safe_event_id("tab\there\u{7f}"), "tab%09here%7F");
        assert_eq!(safe_event_id("é"), "%C3%A9");
        assert_eq!(safe_event_id("msg-1:2@h.x_y~z"), "msg-1:2@h.x_y~z");
        // The mapping is injective: an id that looks encoded is encoded again.
        assert_ne!(safe_event_id("%2F"), safe_event_id("/"));
        assert_eq!(safe_event_id(".."), "..");
    }

    #[test]
    fn long_ids_are_shortened_with_a_hash() {
        let long = "/".repeat(400); // 1,200 characters once encoded
        let id = safe_event_id(&long);
        assert!(id.len() <= MAX_EVENT_ID_LEN, "{}", id.len());
        let (kept, hash) = id.rsplit_once('~').unwrap();
        assert_eq!(hash.len(), 64);
        assert!(kept.len() <= KEPT_PREFIX_LEN && kept.ends_with("%2F"), "{kept}");
        assert_ne!(safe_event_id(&format!("{long}x")), id);
        let fits = "a".repeat(MAX_EVENT_ID_LEN);
        assert_eq!(safe_event_id(&fits), fits);
    }
}
