//! Reading `$body` fields straight from the event's JSON bytes.
//!
//! Parsing a 1 KB body into a `serde_json::Value` costs several microseconds (an allocation per
//! member and string); a route table must decide an event in less. So filters do not call
//! [`CloudEvent::body`](crate::event::CloudEvent::body): the paths they read are gathered into a
//! [`PathTrie`] when they are compiled, and one pass over the bytes picks out just those values,
//! skipping everything else without allocating. Strings without escapes are borrowed from the
//! event. (When the body was parsed already, by whoever called `body()`, evaluation looks the
//! paths up in that value instead: [`lookup_parsed`].)
//!
//! Semantics match `serde_json::Value` (what `CloudEvent::body` gives) exactly: when an object has
//! the same member twice, the last one counts; integers are `i64` or `u64` when they fit and `f64`
//! otherwise, doubles parsed by serde_json. And where serde_json refuses text the event parsers
//! let through (numbers beyond `f64` such as `1e400`, lone surrogate escapes, invalid UTF-8 in
//! binary-mode data, nesting deeper than 127), `body()` gives no body, and so does the scanner,
//! skipped parts included. It looks closely only at what can be refused: strings with escapes or
//! non-ASCII bytes, numbers with an exponent or many digits.

use serde_json::Value;
use std::borrow::Cow;

/// A slot number: the index of a path's value in an extraction.
pub(crate) type SlotId = u32;

/// The set of `$body` paths to extract; each distinct path has a slot number.
#[derive(Debug, Clone)]
pub(crate) struct PathTrie {
    nodes: Vec<TrieNode>,
    /// Each slot's path (the segments after `$body`), by slot number.
    paths: Vec<Box<[Box<str>]>>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// The slot receiving the value at this path, when some filter reads it.
    slot: Option<SlotId>,
    /// Member name to child node.
    children: Vec<(Box<str>, u32)>,
    /// Every slot at or under this node: reset when the node's value is (re)visited, so a repeated
    /// member replaces everything the earlier one set.
    subtree_slots: Box<[SlotId]>,
}

/// A value found at a path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Slot<'a> {
    /// No body, no such member, or a step through a non-object.
    Missing,
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Object,
    Array,
}

impl Default for PathTrie {
    fn default() -> Self {
        PathTrie { nodes: vec![TrieNode::default()], paths: Vec::new() }
    }
}

impl PathTrie {
    /// The number of slots an extraction fills.
    pub fn slot_count(&self) -> usize {
        self.paths.len()
    }

    /// The path of a slot.
    pub fn path(&self, slot: SlotId) -> &[Box<str>] {
        self.paths.get(slot as usize).map_or(&[], |p| &p[..])
    }

    /// Adds a path (the segments after `$body`) and returns its slot; a path already present keeps
    /// its slot. Call [`PathTrie::finish`] after the last insertion.
    pub fn insert<S: AsRef<str>>(&mut self, path: &[S]) -> SlotId {
        let mut node = 0usize;
        for segment in path {
            let segment = segment.as_ref();
            let found = self.nodes[node]
                .children
                .iter()
                .find(|(name, _)| &**name == segment)
                .map(|&(_, child)| child as usize);
            node = match found {
                Some(child) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.push((segment.into(), child as u32));
                    child
                }
            };
        }
        match self.nodes[node].slot {
            Some(slot) => slot,
            None => {
                // A table has far fewer than 2^32 paths: filters are at most 4096 bytes.
                let slot = self.paths.len() as SlotId;
                self.paths.push(path.iter().map(|s| s.as_ref().into()).collect());
                self.nodes[node].slot = Some(slot);
                slot
            }
        }
    }

    /// The slot of a path inserted earlier.
    pub fn lookup<S: AsRef<str>>(&self, path: &[S]) -> Option<SlotId> {
        let mut node = 0usize;
        for segment in path {
            node = self.nodes[node]
                .children
                .iter()
                .find(|(name, _)| &**name == segment.as_ref())
                .map(|&(_, child)| child as usize)?;
        }
        self.nodes[node].slot
    }

    /// Computes the per-node slot lists used to reset repeated members.
    pub fn finish(&mut self) {
        // Children always come after their parent, so walking backwards sees children first.
        for i in (0..self.nodes.len()).rev() {
            let mut all: Vec<SlotId> = self.nodes[i].slot.into_iter().collect();
            for &(_, child) in &self.nodes[i].children {
                all.extend_from_slice(&self.nodes[child as usize].subtree_slots);
            }
            self.nodes[i].subtree_slots = all.into_boxed_slice();
        }
    }

    /// Fills `slots` (one per slot number) from the JSON text `json`. Returns false, with every
    /// slot [`Slot::Missing`], when the text does not scan as JSON.
    pub fn extract<'a>(&self, json: &'a [u8], slots: &mut [Slot<'a>]) -> bool {
        let mut scanner = Scanner { b: json, i: 0, depth: 0 };
        let ok = scanner.value(self, 0, slots).is_ok() && {
            scanner.ws();
            scanner.i == json.len()
        };
        if !ok {
            slots.iter_mut().for_each(|s| *s = Slot::Missing);
        }
        ok
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Deepest nesting of arrays and objects `serde_json` parses (its recursion limit); a deeper body
/// is no body for `CloudEvent::body`, so it is none here either.
const MAX_NESTING: usize = 127;

/// Bit 7 of each byte of `word` that equals `byte` is set, and possibly bits of bytes after the
/// first such byte (borrows), never before it: the lowest set bit is exact.
#[inline]
fn bytes_equal(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Where a string whose contents start at `start` ends (its closing quote), whether it has
/// escapes, and whether it has non-ASCII bytes. Looks at eight bytes at a time for `"` or `\`.
#[inline]
fn string_end(b: &[u8], start: usize) -> Scan<(usize, bool, bool)> {
    let mut j = start;
    let mut escaped = false;
    let mut high = 0u64;
    loop {
        let word = b.get(j..j.saturating_add(8)).and_then(|chunk| <[u8; 8]>::try_from(chunk).ok());
        match word {
            Some(chunk) => {
                let word = u64::from_le_bytes(chunk);
                let found = bytes_equal(word, b'"') | bytes_equal(word, b'\\');
                if found == 0 {
                    high |= word;
                    j += 8;
                    continue;
                }
                let at = (found.trailing_zeros() / 8) as usize;
                // The bytes before the quote or backslash.
                high |= word & ((1u64 << (at * 8)) - 1);
                j += at;
            }
            // Fewer than eight bytes left: one at a time.
            None => loop {
                match b.get(j) {
                    None => return Err(Malformed),
                    Some(b'"' | b'\\') => break,
                    Some(&byte) => {
                        high |= u64::from(byte);
                        j += 1;
                    }
                }
            },
        }
        if b[j] == b'"' {
            return Ok((j, escaped, high & HIGHS != 0));
        }
        escaped = true;
        j += 2; // the backslash and the escaped byte (`\u` digits hold no quote or backslash)
    }
}

/// Scanning failed: the text is not JSON `serde_json` would parse.
struct Malformed;

type Scan<T = ()> = Result<T, Malformed>;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Arrays and objects open around the cursor.
    depth: usize,
}

/// A string's contents as found in the text (between the quotes), and whether it has escapes.
struct RawStr {
    start: usize,
    end: usize,
    escaped: bool,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Scan<u8> {
        self.b.get(self.i).copied().ok_or(Malformed)
    }

    fn expect(&mut self, byte: u8) -> Scan {
        self.ws();
        if self.peek()? != byte {
            return Err(Malformed);
        }
        self.i += 1;
        Ok(())
    }

    /// The value at the cursor, which sits at trie node `node`.
    fn value(&mut self, trie: &PathTrie, node: usize, slots: &mut [Slot<'a>]) -> Scan {
        self.ws();
        let n = &trie.nodes[node];
        for &s in n.subtree_slots.iter() {
            slots[s as usize] = Slot::Missing;
        }
        let found = match self.peek()? {
            b'{' if !n.children.is_empty() => {
                self.object(trie, node, slots)?;
                Slot::Object
            }
            b'{' => {
                self.skip_container()?;
                Slot::Object
            }
            b'[' => {
                self.skip_container()?;
                Slot::Array
            }
            b'"' => {
                let raw = self.string()?;
                if n.slot.is_none() {
                    return Ok(());
                }
                Slot::Str(self.decode(&raw)?)
            }
            _ => self.scalar()?,
        };
        if let Some(slot) = n.slot {
            slots[slot as usize] = found;
        }
        Ok(())
    }

    /// An object whose members may hold wanted paths.
    fn object(&mut self, trie: &PathTrie, node: usize, slots: &mut [Slot<'a>]) -> Scan {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(Malformed);
        }
        self.i += 1; // {
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return Err(Malformed);
            }
            let key = self.string()?;
            self.expect(b':')?;
            match self.child(trie, node, &key)? {
                Some(child) => self.value(trie, child, slots)?,
                None => self.skip_value()?,
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(Malformed),
            }
        }
    }

    /// The trie child named by a member key.
    fn child(&self, trie: &PathTrie, node: usize, key: &RawStr) -> Scan<Option<usize>> {
        let children = &trie.nodes[node].children;
        if key.escaped {
            let name = self.decode(key)?;
            return Ok(children.iter().find(|(n, _)| **n == *name).map(|&(_, c)| c as usize));
        }
        let raw = &self.b[key.start..key.end];
        // Length and first byte first: most keys are not wanted, and differ there.
        Ok(children
            .iter()
            .find(|(n, _)| {
                let n = n.as_bytes();
                n.len() == raw.len() && n.first() == raw.first() && n == raw
            })
            .map(|&(_, c)| c as usize))
    }

    fn skip_value(&mut self) -> Scan {
        self.ws();
        match self.peek()? {
            b'{' | b'[' => self.skip_container(),
            b'"' => self.string().map(drop),
            b't' | b'f' | b'n' => self.scalar().map(drop),
            _ => {
                self.i = skip_number(self.b, self.i)?;
                Ok(())
            }
        }
    }

    /// Skips a whole object or array, counting brackets outside strings. Strings and numbers in
    /// it are checked as `serde_json` would ([`checked_string_end`], [`skip_number`]).
    fn skip_container(&mut self) -> Scan {
        let b = self.b;
        let mut depth = 0usize;
        let mut i = self.i;
        while i < b.len() {
            match b[i] {
                b'"' => i = checked_string_end(b, i + 1)? + 1,
                b'-' | b'0'..=b'9' => i = skip_number(b, i)?,
                b'{' | b'[' => {
                    depth += 1;
                    if self.depth + depth > MAX_NESTING {
                        return Err(Malformed);
                    }
                    i += 1;
                }
                b'}' | b']' => {
                    depth = depth.checked_sub(1).ok_or(Malformed)?;
                    i += 1;
                    if depth == 0 {
                        self.i = i;
                        return Ok(());
                    }
                }
                _ => i += 1,
            }
        }
        Err(Malformed)
    }

    /// A string at the cursor (on its opening quote); leaves the cursor after the closing quote.
    fn string(&mut self) -> Scan<RawStr> {
        let start = self.i + 1;
        let (end, escaped, non_ascii) = string_end(self.b, start)?;
        let raw = RawStr { start, end, escaped };
        if escaped || non_ascii {
            check_string(self.b, &raw, end, non_ascii)?;
        }
        self.i = end + 1;
        Ok(raw)
    }

    fn decode(&self, raw: &RawStr) -> Scan<Cow<'a, str>> {
        let b: &'a [u8] = self.b;
        if !raw.escaped {
            return std::str::from_utf8(&b[raw.start..raw.end]).map(Cow::Borrowed).map_err(|_| Malformed);
        }
        serde_json::from_slice::<String>(&b[raw.start - 1..=raw.end]).map(Cow::Owned).map_err(|_| Malformed)
    }

    /// `true`, `false`, `null` or a number.
    fn scalar(&mut self) -> Scan<Slot<'a>> {
        let rest = &self.b[self.i..];
        let (slot, len) = match rest.first() {
            Some(b't') if rest.starts_with(b"true") => (Slot::Bool(true), 4),
            Some(b'f') if rest.starts_with(b"false") => (Slot::Bool(false), 5),
            Some(b'n') if rest.starts_with(b"null") => (Slot::Null, 4),
            _ => {
                let len = number_len(rest);
                (number(&rest[..len])?, len)
            }
        };
        self.i += len;
        Ok(slot)
    }
}

/// The closing quote of a string starting at `start`, the string checked like the strings the
/// scanner reads ([`check_string`]).
#[inline]
fn checked_string_end(b: &[u8], start: usize) -> Scan<usize> {
    let (end, escaped, non_ascii) = string_end(b, start)?;
    if escaped || non_ascii {
        check_string(b, &RawStr { start, end, escaped }, end, non_ascii)?;
    }
    Ok(end)
}

/// What `serde_json` refuses in a string and the event parsers let through: invalid UTF-8
/// (binary-mode data) and escapes that are not characters (a lone surrogate such as `\ud800`).
/// Only strings with escapes or non-ASCII bytes need a look.
fn check_string(b: &[u8], raw: &RawStr, end: usize, non_ascii: bool) -> Scan {
    let text = &b[raw.start..end];
    if raw.escaped {
        check_escapes(text)?;
    }
    if non_ascii {
        std::str::from_utf8(text).map_err(|_| Malformed)?;
    }
    Ok(())
}

/// The escapes of a string's contents, by serde_json's rules: `\"` `\\` `\/` `\b` `\f` `\n` `\r`
/// `\t` and `\uXXXX`, where a UTF-16 surrogate must be a leading one directly followed by an
/// escaped trailing one.
fn check_escapes(text: &[u8]) -> Scan {
    let hex = |at: usize| -> Scan<u16> {
        let digits = text.get(at..at + 4).ok_or(Malformed)?;
        let digits = std::str::from_utf8(digits).map_err(|_| Malformed)?;
        u16::from_str_radix(digits, 16).map_err(|_| Malformed)
    };
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            i += 1;
            continue;
        }
        match text.get(i + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
            Some(b'u') => {
                let unit = hex(i + 2)?;
                i += 6;
                match unit {
                    0xDC00..=0xDFFF => return Err(Malformed),
                    0xD800..=0xDBFF => {
                        if text.get(i..i + 2) != Some(b"\\u") || !(0xDC00..=0xDFFF).contains(&hex(i + 2)?) {
                            return Err(Malformed);
                        }
                        i += 6;
                    }
                    _ => {}
                }
            }
            _ => return Err(Malformed),
        }
    }
    Ok(())
}

/// Bytes of the number at the start of `rest`.
#[inline]
fn number_len(rest: &[u8]) -> usize {
    rest.iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .unwrap_or(rest.len())
}

/// Skips the number at `i`. One with an exponent or many digits may be beyond `f64`, which
/// `serde_json` refuses (`1e400`): those are parsed to make sure.
#[inline]
fn skip_number(b: &[u8], i: usize) -> Scan<usize> {
    let rest = &b[i..];
    let len = number_len(rest);
    if len == 0 {
        return Err(Malformed);
    }
    let text = &rest[..len];
    if len > 18 || text.iter().any(|c| matches!(c, b'e' | b'E')) {
        number(text)?;
    }
    Ok(i + len)
}

/// A JSON number, as `serde_json::Value` holds it: `i64`, else `u64`, else `f64` (parsed by
/// serde_json too, so both ways of reading a body give the same double and refuse the same
/// numbers).
fn number<'a>(text: &[u8]) -> Scan<Slot<'a>> {
    if text.is_empty() {
        return Err(Malformed);
    }
    if !text.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        // Only ASCII digits and signs were taken, so this is valid UTF-8.
        let digits = std::str::from_utf8(text).map_err(|_| Malformed)?;
        if let Ok(i) = digits.parse::<i64>() {
            return Ok(Slot::Int(i));
        }
        if let Ok(u) = digits.parse::<u64>() {
            return Ok(Slot::UInt(u));
        }
    }
    match serde_json::from_slice::<f64>(text) {
        Ok(f) if f.is_finite() => Ok(Slot::Float(f)),
        _ => Err(Malformed),
    }
}

/// The value at `path` in a parsed body: what the scanner would put in the path's slot.
pub(crate) fn lookup_parsed<'a>(body: &'a Value, path: &[Box<str>]) -> Option<&'a Value> {
    path.iter().try_fold(body, |value, segment| value.as_object()?.get(&**segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract<'a>(paths: &[&[&str]], json: &'a str) -> Vec<Slot<'a>> {
        let mut trie = PathTrie::default();
        let ids: Vec<SlotId> = paths.iter().map(|p| trie.insert(p)).collect();
        trie.finish();
        let mut slots = vec![Slot::Missing; trie.slot_count()];
        trie.extract(json.as_bytes(), &mut slots);
        ids.iter().map(|&i| slots[i as usize].clone()).collect()
    }

    #[test]
    fn picks_nested_values_and_skips_the_rest() {
        let json = r#" { "skip": [1, {"a": "}"}, "]"], "$metadata": {"$model": "dtmi:x;1", "n": -2},
            "t": 21.5, "big": 18446744073709551615, "huge": 1e300, "s": "a\"b\u0041", "o": {}, "z": null,
            "b": true } "#;
        let got = extract(
            &[
                &["$metadata", "$model"],
                &["$metadata", "n"],
                &["t"],
                &["big"],
                &["s"],
                &["o"],
                &["z"],
                &["b"],
                &["skip"],
                &["nope"],
                &["t", "x"],
                &[],
            ],
            json,
        );
        assert_eq!(
            got,
            [
                Slot::Str("dtmi:x;1".into()),
                Slot::Int(-2),
                Slot::Float(21.5),
                Slot::UInt(u64::MAX),
                Slot::Str("a\"bA".into()),
                Slot::Object,
                Slot::Null,
                Slot::Bool(true),
                Slot::Array,
                Slot::Missing,
                Slot::Missing,
                Slot::Object,
            ]
        );
    }

    #[test]
    fn parsed_bodies_give_the_same_values() {
        use crate::filter::eval::Val;
        let json = r#"{"a": {"b": "x\u00e9", "c": [1]}, "n": -5, "u": 18446744073709551615, "f": 0.1, "a": {"b": 2}, "z": null}"#;
        let paths: &[&[&str]] =
            &[&["a", "b"], &["a", "c"], &["a"], &["n"], &["u"], &["f"], &["z"], &["q"], &["n", "x"], &[]];
        let mut trie = PathTrie::default();
        for p in paths {
            trie.insert(p);
        }
        trie.finish();
        let mut scanned = vec![Slot::Missing; trie.slot_count()];
        assert!(trie.extract(json.as_bytes(), &mut scanned));
        let value: Value = serde_json::from_str(json).unwrap();
        for (slot, found) in scanned.iter().enumerate() {
            let parsed =
                lookup_parsed(&value, trie.path(slot as SlotId)).map_or(Val::Missing, Val::from_json);
            assert_eq!(Val::from_slot(found), parsed, "{:?}", trie.path(slot as SlotId));
        }
        assert_eq!(scanned[0], Slot::Int(2));
    }

    #[test]
    fn last_duplicate_wins_like_serde_json() {
        let got = extract(&[&["a", "b"], &["a"]], r#"{"a": {"b": 1}, "a": 5}"#);
        assert_eq!(got, [Slot::Missing, Slot::Int(5)]);
        let got = extract(&[&["a", "b"]], r#"{"a": 5, "a": {"b": 2}}"#);
        assert_eq!(got, [Slot::Int(2)]);
    }

    #[test]
    fn string_ends_at_every_alignment() {
        let cases = [
            ("", false, false),
            ("abc", false, false),
            ("a\\\"b", true, false),
            ("0123456789abcdef\\\\", true, false),
            ("é€", false, true),
            ("0123456789é", false, true),
        ];
        for prefix in 0..20 {
            for (inner, escaped, non_ascii) in cases {
                let text = format!("{}\"{inner}\"xyz", " ".repeat(prefix));
                let found = string_end(text.as_bytes(), prefix + 1).ok();
                assert_eq!(found, Some((prefix + 1 + inner.len(), escaped, non_ascii)), "{text}");
            }
            let open = format!("{}\"abc\\\"", " ".repeat(prefix));
            assert!(string_end(open.as_bytes(), prefix + 1).is_err());
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses_even_where_it_skips() {
        let deep = |n: usize| format!("{{\"a\": 1, \"x\": {}{}}}", "[".repeat(n), "]".repeat(n));
        let deep_object = |n: usize| format!("{}\"a\": 1{}", "{\"a\": ".repeat(n - 1) + "{", "}".repeat(n));
        let cases: Vec<Vec<u8>> = vec![
                br#"{"a": 1, "x": [1e400]}"#.to_vec(),
                br#"{"a": 1, "x": 1e400}"#.to_vec(),
                br#"{"a": 1, "x": -123456789012345678901234567890e300}"#.to_vec(),
                format!(r#"{{"a": 1, "x": [{}]}}"#, "9".repeat(400)).into_bytes(),
                br#"{"a": 1, "x": ["\ud800"]}"#.to_vec(),
                br#"{"a": 1, "\udc00": 2}"#.to_vec(),
                b"{\"a\": 1, \"x\": \"\xff\"}".to_vec(),
                b"{\"a\": 1, \"x\": {\"\xc3\": 1}}".to_vec(),
                r#"{"a": 1, "x": 1e-400, "y": "\ud83d\ude00", "z": "é", "w": [18446744073709551616]}"#
                    .as_bytes()
                    .to_vec(),
                deep(126).into_bytes(),
                deep(127).into_bytes(),
                deep_object(127).into_bytes(),
                deep_object(128).into_bytes(),
            ];
        for json in cases {
            let value = serde_json::from_slice::<Value>(&json).ok();
            let mut trie = PathTrie::default();
            trie.insert(&["a"]);
            trie.finish();
            let mut slots = vec![Slot::Missing];
            let scanned = trie.extract(&json, &mut slots);
            assert_eq!(scanned, value.is_some(), "{}", String::from_utf8_lossy(&json));
            assert_eq!(slots[0] != Slot::Missing, value.is_some());
        }
    }

    #[test]
    fn escapes_are_checked_as_serde_json_does() {
        for text in [
            r#"a\"b"#,
            r#"\\\/\b\f\n\r\t"#,
            r#"\u0041"#,
            r#"\ud83d\ude00"#,
            r#"\uD83D\uDE00x"#,
            r#"\ud800"#,
            r#"\udc00"#,
            r#"\ud800\u0041"#,
            r#"\ud800x"#,
            r#"\ud800\n"#,
            r#"\u12"#,
            r#"\u12g4"#,
            r#"\x"#,
            r#"\"#,
            r#"\ud83d\ude00\ud83d"#,
        ] {
            let quoted = format!("\"{text}\"");
            let serde_ok = serde_json::from_str::<String>(&quoted).is_ok();
            assert_eq!(check_escapes(text.as_bytes()).is_ok(), serde_ok, "{text}");
        }
    }

    #[test]
    fn escaped_keys_match() {
        let got = extract(&[&["$model"]], r#"{"\u0024model": "m"}"#);
        assert_eq!(got, [Slot::Str("m".into())]);
    }

    #[test]
    fn malformed_text_is_no_body() {
        for bad in ["", "{", r#"{"a": }"#, r#"{"a": 1"#, "[1,", r#"{"a": "x"} x"#, "\"\\", "-"] {
            assert_eq!(extract(&[&["a"], &[]], bad), [Slot::Missing, Slot::Missing], "{bad}");
        }
    }
}
