//! The Event Hubs start-position filter (`apache.org:selector-filter:string`).
//!
//! Event Hubs consumers say where to start reading with a SQL-like selector on the source of
//! their receiver link. `azure_messaging_eventhubs` 0.15 (`StartPosition::start_expression`)
//! sends exactly these forms, `>` or `>=` each, the value quoted:
//!
//! ```text
//! amqp.annotation.x-opt-offset > '-1'            earliest (StartLocation::Earliest)
//! amqp.annotation.x-opt-offset > '@latest'       only new events (the default)
//! amqp.annotation.x-opt-offset >='12345'         from an offset
//! amqp.annotation.x-opt-sequence-number >'42'    from a sequence number
//! amqp.annotation.x-opt-enqueued-time >'1700000000000'   from a time, in ms since the epoch
//! ```
//!
//! Other SDKs leave the value unquoted (`> 42`); both are accepted. Anything else is refused,
//! so a client that sends something new fails loudly instead of reading from a wrong position.

/// Where a consumer starts, as the filter said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartAt {
    /// After (or at, when inclusive) this offset; `-1` is before the first event.
    Offset { offset: i64, inclusive: bool },
    /// Only events enqueued after the receiver attached.
    Latest,
    /// After (or at) this sequence number.
    SequenceNumber { sequence_number: i64, inclusive: bool },
    /// Events enqueued after (or at) this time, in milliseconds since the Unix epoch.
    EnqueuedTime { millis: i64, inclusive: bool },
}

/// Parses a selector; the error says what was not understood.
pub(crate) fn parse(selector: &str) -> Result<StartAt, String> {
    let text = selector.trim();
    let lower = text.to_ascii_lowercase();
    const PREFIX: &str = "amqp.annotation.";
    let rest = lower.strip_prefix(PREFIX).ok_or_else(|| unsupported(selector))?;
    let name_len = rest.find(|c: char| c.is_whitespace() || c == '>' || c == '=' || c == '<');
    let (name, rest) = rest.split_at(name_len.ok_or_else(|| unsupported(selector))?);
    let rest = rest.trim_start();
    let (inclusive, value) = if let Some(v) = rest.strip_prefix(">=") {
        (true, v)
    } else if let Some(v) = rest.strip_prefix('>') {
        (false, v)
    } else {
        return Err(format!("unsupported operator in selector {selector:?}: only '>' and '>=' are"));
    };
    // The value keeps its case from the original text ('@latest' is compared lower-cased).
    let value = text[text.len() - value.len()..].trim();
    let value = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(quoted) => quoted,
        None => value,
    };
    let number = |what: &str| {
        value
            .parse::<i64>()
            .map_err(|_| format!("{what} {value:?} in selector {selector:?} is not an integer"))
    };
    match name {
        "x-opt-offset" if value.eq_ignore_ascii_case("@latest") => Ok(StartAt::Latest),
        "x-opt-offset" => Ok(StartAt::Offset { offset: number("offset")?, inclusive }),
        "x-opt-sequence-number" => {
            Ok(StartAt::SequenceNumber { sequence_number: number("sequence number")?, inclusive })
        }
        "x-opt-enqueued-time" => Ok(StartAt::EnqueuedTime { millis: number("enqueued time")?, inclusive }),
        _ => Err(unsupported(selector)),
    }
}

fn unsupported(selector: &str) -> String {
    format!(
        "unsupported selector {selector:?}: expected amqp.annotation.x-opt-offset, \
         x-opt-sequence-number or x-opt-enqueued-time compared with '>' or '>='"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_the_rust_sdk_sends() {
        let off = |offset, inclusive| Ok(StartAt::Offset { offset, inclusive });
        assert_eq!(parse("amqp.annotation.x-opt-offset > '-1'"), off(-1, false));
        assert_eq!(parse("amqp.annotation.x-opt-offset > '@latest'"), Ok(StartAt::Latest));
        assert_eq!(parse("amqp.annotation.x-opt-offset >'12345'"), off(12345, false));
        assert_eq!(parse("amqp.annotation.x-opt-offset >='12345'"), off(12345, true));
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number >'12345'"),
            Ok(StartAt::SequenceNumber { sequence_number: 12345, inclusive: false })
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-sequence-number >='7'"),
            Ok(StartAt::SequenceNumber { sequence_number: 7, inclusive: true })
        );
        assert_eq!(
            parse("amqp.annotation.x-opt-enqueued-time >'1700000000000'"),
            Ok(StartAt::EnqueuedTime { millis: 1_700_000_000_000, inclusive: false })
        );
    }

    #[test]
    fn other_spellings() {
        assert_eq!(
            parse("  AMQP.Annotation.X-Opt-Sequence-Number>=42 "),
            Ok(StartAt::SequenceNumber { sequence_number: 42, inclusive: true })
        );
        assert_eq!(parse("amqp.annotation.x-opt-offset > '@LATEST'"), Ok(StartAt::Latest));
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-offset < '1'",
            "amqp.annotation.x-opt-offset = '1'",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-partition-key > '1'",
            "amqp.annotation.x-opt-offset",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
