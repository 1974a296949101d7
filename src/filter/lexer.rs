//! Tokens of the filter language, produced one at a time as the parser asks for them (so the first
//! error reported is the first one in the text).

use super::error::FilterError;

/// One token and where it starts (byte offset into the filter text).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub kind: TokenKind,
    pub offset: usize,
    /// Byte length in the text.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenKind {
    /// A bare word: a keyword, a function or attribute name, or a mistake. Compared by the parser.
    Word,
    /// `$body` and its path; the segments are re-split by the parser from the token text.
    BodyPath,
    /// A `$` word other than `$body` (an unknown field).
    DollarWord,
    String(String),
    Integer(i64),
    Double(f64),
    LParen,
    RParen,
    Comma,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    End,
}

pub(crate) struct Lexer<'t> {
    text: &'t str,
    pos: usize,
    peeked: Option<Token>,
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

/// Characters of an identifier after the first, and of `$body` path segments.
pub(crate) fn is_segment_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

/// First character of a `$body` path segment (no digits: array elements are not addressable, and
/// `$body.items.0` would look as if they were).
pub(crate) fn is_segment_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b'$'
}

impl<'t> Lexer<'t> {
    pub fn new(text: &'t str) -> Self {
        Lexer { text, pos: 0, peeked: None }
    }

    pub fn text(&self) -> &'t str {
        self.text
    }

    /// The text of a token.
    pub fn slice(&self, token: &Token) -> &'t str {
        &self.text[token.offset..token.offset + token.len]
    }

    pub fn peek(&mut self) -> Result<&Token, FilterError> {
        if self.peeked.is_none() {
            let token = self.lex()?;
            self.peeked = Some(token);
        }
        Ok(self.peeked.as_ref().expect("just filled"))
    }

    pub fn next(&mut self) -> Result<Token, FilterError> {
        match self.peeked.take() {
            Some(token) => Ok(token),
            None => self.lex(),
        }
    }

    fn bytes(&self) -> &'t [u8] {
        self.text.as_bytes()
    }

    fn at(&self, i: usize) -> Option<u8> {
        self.bytes().get(i).copied()
    }

    fn error(&self, offset: usize, expected: &str, found: String) -> FilterError {
        FilterError::new(self.text, offset, expected, found)
    }

    /// The character at `offset`, described for an error message.
    fn char_at(&self, offset: usize) -> String {
        match self.text[offset..].chars().next() {
            Some(c) => format!("`{c}`"),
            None => "the end of the filter".into(),
        }
    }

    fn lex(&mut self) -> Result<Token, FilterError> {
        while self.at(self.pos).is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(b) = self.at(start) else {
            return Ok(Token { kind: TokenKind::End, offset: start, len: 0 });
        };
        let next = self.at(start + 1);
        let (kind, len) = match b {
            b'(' => (TokenKind::LParen, 1),
            b')' => (TokenKind::RParen, 1),
            b',' => (TokenKind::Comma, 1),
            b'=' if next == Some(b'=') => {
                return Err(self
                    .error(start, "a value", "`==`".into())
                    .with_hint("equality is written with a single `=`"))
            }
            b'=' => (TokenKind::Eq, 1),
            b'!' if next == Some(b'=') => (TokenKind::Ne, 2),
            b'<' if next == Some(b'=') => (TokenKind::Le, 2),
            b'<' if next == Some(b'>') => {
                return Err(self
                    .error(start, "a comparison operator", "`<>`".into())
                    .with_hint("inequality is written `!=`"))
            }
            b'<' => (TokenKind::Lt, 1),
            b'>' if next == Some(b'=') => (TokenKind::Ge, 2),
            b'>' => (TokenKind::Gt, 1),
            b'\'' => return self.string(start),
            b'-' | b'0'..=b'9' => return self.number(start),
            b'$' => {
                let mut end = start + 1;
                while self.at(end).is_some_and(is_segment_char) {
                    end += 1;
                }
                if &self.text[start..end] == "$body" {
                    return self.body_path(start, end);
                }
                (TokenKind::DollarWord, end - start)
            }
            b if is_word_start(b) => {
                let mut end = start + 1;
                while self.at(end).is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    end += 1;
                }
                (TokenKind::Word, end - start)
            }
            _ => {
                let hint = match (b, next) {
                    (b'"', _) => Some("strings are written in single quotes: 'text'"),
                    (b'&', Some(b'&')) => Some("conjunction is written `AND`"),
                    (b'|', Some(b'|')) => Some("disjunction is written `OR`"),
                    (b'!', _) => Some("negation is written `NOT`, inequality `!=`"),
                    (b'[', _) => Some("array elements cannot be addressed in a filter"),
                    _ => None,
                };
                let err = self.error(start, "a field, a literal, an operator or `(`", self.char_at(start));
                return Err(match hint {
                    Some(h) => err.with_hint(h),
                    None => err,
                });
            }
        };
        self.pos = start + len;
        Ok(Token { kind, offset: start, len })
    }

    /// `'...'` with `''` standing for one quote. Anything else, newlines included, is literal.
    fn string(&mut self, start: usize) -> Result<Token, FilterError> {
        let bytes = self.bytes();
        let mut value = String::new();
        let mut i = start + 1;
        loop {
            match memchr::memchr(b'\'', &bytes[i..]) {
                None => {
                    return Err(self
                        .error(
                            start,
                            "a closing `'` for the string that starts here",
                            "the end of the filter".into(),
                        )
                        .with_hint("a quote inside a string is written twice: 'it''s'"))
                }
                Some(rel) => {
                    let quote = i + rel;
                    value.push_str(&self.text[i..quote]);
                    if bytes.get(quote + 1) == Some(&b'\'') {
                        value.push('\'');
                        i = quote + 2;
                    } else {
                        self.pos = quote + 1;
                        return Ok(Token {
                            kind: TokenKind::String(value),
                            offset: start,
                            len: self.pos - start,
                        });
                    }
                }
            }
        }
    }

    fn digits(&self, mut i: usize) -> usize {
        while self.at(i).is_some_and(|b| b.is_ascii_digit()) {
            i += 1;
        }
        i
    }

    /// `-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?`: an integer when it has neither `.` nor exponent.
    fn number(&mut self, start: usize) -> Result<Token, FilterError> {
        let mut i = start;
        if self.at(i) == Some(b'-') {
            i += 1;
        }
        let int_end = self.digits(i);
        if int_end == i {
            return Err(self.error(i, "a digit after `-`", self.char_at(i)));
        }
        let mut end = int_end;
        let mut is_double = false;
        if self.at(end) == Some(b'.') {
            let frac_end = self.digits(end + 1);
            if frac_end == end + 1 {
                return Err(self.error(end + 1, "a digit after `.`", self.char_at(end + 1)));
            }
            end = frac_end;
            is_double = true;
        }
        if matches!(self.at(end), Some(b'e' | b'E')) {
            let mut exp = end + 1;
            if matches!(self.at(exp), Some(b'+' | b'-')) {
                exp += 1;
            }
            let exp_end = self.digits(exp);
            if exp_end == exp {
                return Err(self.error(exp, "a digit in the exponent", self.char_at(exp)));
            }
            end = exp_end;
            is_double = true;
        }
        let text = &self.text[start..end];
        let kind = if is_double {
            match text.parse::<f64>() {
                Ok(d) if d.is_finite() => TokenKind::Double(d),
                _ => {
                    return Err(self.error(
                        start,
                        "a number within the range of a double (about ±1.8e308)",
                        format!("`{text}`"),
                    ))
                }
            }
        } else {
            match text.parse::<i64>() {
                Ok(i) => TokenKind::Integer(i),
                Err(_) => {
                    return Err(self
                        .error(
                            start,
                            "an integer between -9223372036854775808 and 9223372036854775807",
                            format!("`{text}`"),
                        )
                        .with_hint("larger numbers can be written as doubles, e.g. 1.8e19"))
                }
            }
        };
        self.pos = end;
        Ok(Token { kind, offset: start, len: end - start })
    }

    /// `$body(.segment)*`, no spaces inside.
    fn body_path(&mut self, start: usize, mut end: usize) -> Result<Token, FilterError> {
        while self.at(end) == Some(b'.') {
            let seg = end + 1;
            if !self.at(seg).is_some_and(is_segment_start) {
                let err = self.error(
                    seg,
                    "a property name after `.` (letters, digits, `_` and `$`, not starting with a digit)",
                    self.char_at(seg),
                );
                return Err(if self.at(seg).is_some_and(|b| b.is_ascii_digit()) {
                    err.with_hint("array elements cannot be addressed in a filter")
                } else {
                    err
                });
            }
            end = seg + 1;
            while self.at(end).is_some_and(is_segment_char) {
                end += 1;
            }
        }
        self.pos = end;
        Ok(Token { kind: TokenKind::BodyPath, offset: start, len: end - start })
    }
}
