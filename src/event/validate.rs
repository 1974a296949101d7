//! Checks of attribute forms. Each returns a message naming what is wrong, never the attribute
//! (the caller knows which attribute it is checking and adds it).

use time::format_description::well_known::Rfc3339;

/// `time`: an RFC 3339 timestamp (ADT writes `2021-12-09T20:28:52.9795363Z`).
pub(crate) fn time(value: &str) -> Result<(), String> {
    // RFC 3339 lets applications use a space for `T`; CloudEvents producers do not, so refuse it.
    let separator_ok = matches!(value.as_bytes().get(10), Some(b'T' | b't'));
    let parsed = time::OffsetDateTime::parse(value, &Rfc3339).ok().filter(|_| separator_ok);
    parsed.map(|_| ()).ok_or_else(|| {
        format!("{value:?} is not an RFC 3339 timestamp (expected e.g. 2021-12-09T20:28:52.9795363Z)")
    })
}

/// `traceparent`: W3C trace context `00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex, ids not all zero.
pub(crate) fn traceparent(value: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{value:?} is not a W3C traceparent (expected version-traceid-parentid-flags, \
             e.g. 00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01)"
        )
    };
    let parts: Vec<&str> = value.split('-').collect();
    let lower_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match parts.as_slice() {
        [version, trace_id, parent_id, flags]
            if version.len() == 2
                && trace_id.len() == 32
                && parent_id.len() == 16
                && flags.len() == 2
                && parts.iter().all(|p| lower_hex(p)) =>
        {
            if *version == "ff" {
                return Err(format!("{value:?}: version ff is invalid in a traceparent"));
            }
            if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
                return Err(format!("{value:?}: trace id and parent id must not be all zeros"));
            }
            Ok(())
        }
        // Future versions may append fields after the flags; version 00 may not.
        [version, trace_id, parent_id, flags, ..]
            if *version != "00"
                && *version != "ff"
                && version.len() == 2
                && trace_id.len() == 32
                && parent_id.len() == 16
                && flags.len() == 2
                && parts[..4].iter().all(|p| lower_hex(p)) =>
        {
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// `datacontenttype`: an RFC 2046 media type, `type/subtype` with optional parameters.
pub(crate) fn media_type(value: &str) -> Result<(), String> {
    let essence = value.split(';').next().unwrap_or("").trim();
    let token =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
    match essence.split_once('/') {
        Some((ty, sub)) if token(ty) && token(sub) => Ok(()),
        _ => Err(format!("{value:?} is not a media type (expected type/subtype, e.g. application/json)")),
    }
}

/// True for media types whose payload is JSON (`application/json`, `text/json`, `*/*+json`).
pub(crate) fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((ty, sub)) = essence.split_once('/') else { return false };
    let sub = sub.to_ascii_lowercase();
    (ty.eq_ignore_ascii_case("application") || ty.eq_ignore_ascii_case("text"))
        && (sub == "json" || sub.ends_with("+json"))
        || sub.ends_with("+json")
}

/// Non-empty and free of control characters: what every string attribute must be.
pub(crate) fn plain_string(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    // ASCII (nearly always) checked byte by byte; otherwise by character, for the C1 controls.
    let control = if value.is_ascii() {
        value.bytes().any(|b| b.is_ascii_control())
    } else {
        value.chars().any(char::is_control)
    };
    if control {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Extension attribute names: lower-case letters and digits, as CloudEvents requires.
pub(crate) fn extension_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 20
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "{name:?} is not a valid CloudEvents attribute name (1 to 20 lower-case letters and digits)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_accepts_adt_form_and_offsets() {
        assert!(time("2021-12-09T20:28:52.9795363Z").is_ok());
        assert!(time("2021-12-09T20:28:52Z").is_ok());
        assert!(time("2021-12-09T20:28:52+02:00").is_ok());
        assert!(time("2021-12-09 20:28:52Z").is_err());
        assert!(time("yesterday").is_err());
        assert!(time("2021-13-09T20:28:52Z").is_err());
    }

    #[test]
    fn traceparent_forms() {
        assert!(traceparent("00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01").is_ok());
        assert!(traceparent("00-2AA957558DB348F387EF704B37631A1D-96f834571bf4fe45-01").is_err());
        assert!(traceparent("00-00000000000000000000000000000000-96f834571bf4fe45-01").is_err());
        assert!(traceparent("00-2aa957558db348f387ef704b37631a1d-0000000000000000-01").is_err());
        assert!(traceparent("ff-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01").is_err());
        assert!(traceparent("00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01-extra").is_err());
        assert!(traceparent("01-2aa957558db348f387ef704b37631a1d-96f834571bf4fe45-01-extra").is_ok());
        assert!(traceparent("00-2aa957558db348f387ef704b37631a1d-96f834571bf4fe4-01").is_err());
        assert!(traceparent("").is_err());
    }

    #[test]
    fn media_types() {
        assert!(media_type("application/json").is_ok());
        assert!(media_type("application/json; charset=utf-8").is_ok());
        assert!(media_type("json").is_err());
        assert!(media_type("/json").is_err());
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/cloudevents+json"));
        assert!(is_json_media_type("text/json"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type("application/octet-stream"));
    }

    #[test]
    fn extension_names() {
        assert!(extension_name("tracestate").is_ok());
        assert!(extension_name("Trace").is_err());
        assert!(extension_name("trace-state").is_err());
        assert!(extension_name("abcdefghijklmnopqrstu").is_err());
    }
}
