//! Reading `$body` fields straight from the event's JSON bytes.
//!
//! Parsing a 1 KB body into a `serde_json::Value` costs several microseconds (an allocation per
//! member and string); a route table must decide an event in less. So filters do not use
//! [`CloudEvent::body`](crate::event::CloudEvent::body): the paths they read are gathered into a
//! [`PathTrie`] when they are compiled, and one pass over the bytes picks out just those values,
//! skipping everything else without allocating. Strings without escapes are borrowed from the
//! event.
//!
//! Semantics match `serde_json::Value` (what `CloudEvent::body` gives): when an object has the same
//! member twice, the last one counts; integers are `i64` or `u64` when they fit and `f64`
//! otherwise. The bytes were validated as JSON when the event was built; if they still do not scan
//! (which would be a bug), the body counts as absent.

use memchr::memchr2;
use std::borrow::Cow;

/// The largest number of distinct paths one trie can hold (slot numbers are `u16`).
pub(crate) const MAX_SLOTS: usize = u16::MAX as usize;

/// The set of `$body` paths to extract; each distinct path has a slot number.
#[derive(Debug, Clone)]
pub(crate) struct PathTrie {
    nodes: Vec<TrieNode>,
    slots: usize,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    /// The slot receiving the value at this path, when some filter reads it.
    slot: Option<u16>,
    /// Member name to child node.
    children: Vec<(Box<str>, u32)>,
    /// Every slot at or under this node: reset when the node's value is (re)visited, so a repeated
    /// member replaces everything the earlier one set.
    subtree_slots: Box<[u16]>,
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
        PathTrie { nodes: vec![TrieNode::default()], slots: 0 }
    }
}

impl PathTrie {
    /// The number of slots an extraction fills.
    pub fn slot_count(&self) -> usize {
        self.slots
    }

    /// Adds a path (the segments after `$body`) and returns its slot; a path already present keeps
    /// its slot. Call [`PathTrie::finish`] after the last insertion.
    pub fn insert<S: AsRef<str>>(&mut self, path: &[S]) -> u16 {
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
                assert!(self.slots < MAX_SLOTS, "too many distinct $body paths");
                let slot = self.slots as u16;
                self.slots += 1;
                self.nodes[node].slot = Some(slot);
                slot
            }
        }
    }

    /// The slot of a path inserted earlier.
    pub fn lookup<S: AsRef<str>>(&self, path: &[S]) -> Option<u16> {
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
            let mut all: Vec<u16> = self.nodes[i].slot.into_iter().collect();
            for &(_, child) in &self.nodes[i].children {
                all.extend_from_slice(&self.nodes[child as usize].subtree_slots);
            }
            self.nodes[i].subtree_slots = all.into_boxed_slice();
        }
    }

    /// Fills `slots` (one per slot number) from the JSON text `json`. Returns false, with every
    /// slot [`Slot::Missing`], when the text does not scan as JSON.
    pub fn extract<'a>(&self, json: &'a [u8], slots: &mut [Slot<'a>]) -> bool {
        let mut scanner = Scanner { b: json, i: 0 };
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

/// The closing quote of a string whose contents start at `start`, and whether it has escapes.
/// Most strings in twin events are short, where a plain loop beats a vectorized search; long
/// ones switch to `memchr2` after the first 32 bytes.
#[inline]
fn string_end(b: &[u8], start: usize) -> Scan<(usize, bool)> {
    let mut j = start;
    let mut escaped = false;
    let short_end = start.saturating_add(32).min(b.len());
    while j < short_end {
        match b[j] {
            b'"' => return Ok((j, escaped)),
            b'\\' => {
                escaped = true;
                j += 2; // the backslash and the escaped byte (`\u` digits hold no quote)
            }
            _ => j += 1,
        }
    }
    loop {
        let rest = b.get(j..).ok_or(Malformed)?;
        j += memchr2(b'"', b'\\', rest).ok_or(Malformed)?;
        if b[j] == b'"' {
            return Ok((j, escaped));
        }
        escaped = true;
        j += 2;
    }
}

/// Scanning failed: the text is not JSON.
struct Malformed;

type Scan<T = ()> = Result<T, Malformed>;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
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
        self.i += 1; // {
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
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
        Ok(children.iter().find(|(n, _)| n.as_bytes() == raw).map(|&(_, c)| c as usize))
    }

    fn skip_value(&mut self) -> Scan {
        self.ws();
        match self.peek()? {
            b'{' | b'[' => self.skip_container(),
            b'"' => self.string().map(drop),
            _ => self.scalar().map(drop),
        }
    }

    /// Skips a whole object or array, counting brackets outside strings.
    fn skip_container(&mut self) -> Scan {
        let mut depth = 0usize;
        let mut i = self.i;
        loop {
            match *self.b.get(i).ok_or(Malformed)? {
                b'"' => {
                    i = string_end(self.b, i + 1)?.0 + 1;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1).ok_or(Malformed)?;
                    if depth == 0 {
                        self.i = i + 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// A string at the cursor (on its opening quote); leaves the cursor after the closing quote.
    fn string(&mut self) -> Scan<RawStr> {
        let start = self.i + 1;
        let (end, escaped) = string_end(self.b, start)?;
        self.i = end + 1;
        Ok(RawStr { start, end, escaped })
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
        for (word, slot) in
            [(&b"true"[..], Slot::Bool(true)), (b"false", Slot::Bool(false)), (b"null", Slot::Null)]
        {
            if rest.starts_with(word) {
                self.i += word.len();
                return Ok(slot);
            }
        }
        let len = rest
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(Malformed);
        }
        // Only ASCII bytes were taken, so this is valid UTF-8.
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| Malformed)?;
        self.i += len;
        let integer = !text.contains(['.', 'e', 'E']);
        if integer {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(Slot::Int(i));
            }
            if let Ok(u) = text.parse::<u64>() {
                return Ok(Slot::UInt(u));
            }
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Slot::Float(f)),
            _ => Err(Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract<'a>(paths: &[&[&str]], json: &'a str) -> Vec<Slot<'a>> {
        let mut trie = PathTrie::default();
        let ids: Vec<u16> = paths.iter().map(|p| trie.insert(p)).collect();
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
    fn last_duplicate_wins_like_serde_json() {
        let got = extract(&[&["a", "b"], &["a"]], r#"{"a": {"b": 1}, "a": 5}"#);
        assert_eq!(got, [Slot::Missing, Slot::Int(5)]);
        let got = extract(&[&["a", "b"]], r#"{"a": 5, "a": {"b": 2}}"#);
        assert_eq!(got, [Slot::Int(2)]);
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
