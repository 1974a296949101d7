//! Parse errors: where, what was expected, what was found, and a caret under the spot.

use std::fmt;

/// A filter that does not parse.
///
/// `Display` gives `expected X, found Y at offset N`, then the filter text (the line holding the
/// offset, for multi-line filters) and a caret under the offending spot, then a hint if there is
/// one. The admin API returns it as the `EventRouteFilterInvalid` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// Byte offset into the filter text.
    pub offset: usize,
    /// What the parser was looking for, e.g. "`)`" or "a value (a field or a literal)".
    pub expected: String,
    /// What it found instead, e.g. "`AND`" or "the end of the filter".
    pub found: String,
    /// A suggestion, e.g. "did you mean `type`? Field names are lower case".
    pub hint: Option<String>,
    /// The filter text, for the caret rendering.
    text: String,
}

impl FilterError {
    pub(crate) fn new(text: &str, offset: usize, expected: &str, found: String) -> Self {
        FilterError { offset, expected: expected.to_owned(), found, hint: None, text: text.to_owned() }
    }

    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The filter text the error is about.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The line holding the offset and the caret line under it (columns counted in characters;
    /// tabs are kept so the caret lines up in a terminal).
    fn caret(&self) -> (&str, String) {
        let offset = floor_char_boundary(&self.text, self.offset.min(self.text.len()));
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[offset..].find('\n').map_or(self.text.len(), |i| offset + i);
        let line = self.text[line_start..line_end].trim_end_matches('\r');
        let mut caret: String =
            self.text[line_start..offset].chars().map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
        caret.push('^');
        (line, caret)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (line, caret) = self.caret();
        write!(
            f,
            "expected {}, found {} at offset {}\n{line}\n{caret}",
            self.expected, self.found, self.offset
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FilterError {}
