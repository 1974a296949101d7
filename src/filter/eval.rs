//! The compiled form of a filter and its evaluation.
//!
//! Compiling folds what does not depend on the event (literal-only comparisons, `specversion`,
//! which is always `1.0`, attributes compared with numbers or booleans, `true`/`false` inside
//! `AND`/`OR`/`NOT`), flattens nested `AND`s and `OR`s, and puts conditions on context attributes
//! before those reading `$body`, so the body is only scanned when the attributes did not decide.
//! Evaluation is two-valued and has no side effects, so the order is not observable.
//!
//! Filters are compiled against a [`Shared`] context: the `$body` paths to extract (a
//! [`PathTrie`]) and per-attribute dictionaries of the string literals compared with `=`/`!=`.
//! A route table compiles all its filters against one context, so each event's body is scanned
//! once and each attribute is looked up once, however many routes read them; `type = '...'` in
//! thirty routes is then thirty integer comparisons. Leaves of the common shapes (attribute vs
//! string literal, function of an attribute and a literal, body field vs literal) have their own
//! node kinds. Nothing allocates while evaluating, except decoding a `$body` string that has JSON
//! escapes and extracting more than 16 distinct `$body` paths.

use super::ast::{CompareOp, Expr, Field, Function, Literal, Operand};
use super::body::{lookup_parsed, PathTrie, Slot, SlotId};
use crate::event::{Attribute, CloudEvent, DataEncoding, SPEC_VERSION};
use memchr::memmem;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A value as a comparison sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Val<'v> {
    /// Absent attribute, no body, or no such path.
    Missing,
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'v str),
    Object,
    Array,
}

impl<'v> Val<'v> {
    pub(crate) fn from_slot(slot: &'v Slot<'_>) -> Val<'v> {
        match slot {
            Slot::Missing => Val::Missing,
            Slot::Null => Val::Null,
            Slot::Bool(b) => Val::Bool(*b),
            Slot::Int(i) => Val::Int(*i),
            Slot::UInt(u) => Val::UInt(*u),
            Slot::Float(f) => Val::Float(*f),
            Slot::Str(s) => Val::Str(s),
            Slot::Object => Val::Object,
            Slot::Array => Val::Array,
        }
    }

    /// A value of a parsed body, as the scanner would have found it.
    pub(crate) fn from_json(value: &'v serde_json::Value) -> Val<'v> {
        use serde_json::Value;
        match value {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Val::Int(i),
                (None, Some(u)) => Val::UInt(u),
                (None, None) => n.as_f64().map_or(Val::Missing, Val::Float),
            },
            Value::String(s) => Val::Str(s),
            Value::Array(_) => Val::Array,
            Value::Object(_) => Val::Object,
        }
    }

    pub(crate) fn from_literal(literal: &'v Literal) -> Val<'v> {
        match literal {
            Literal::String(s) => Val::Str(s),
            Literal::Integer(i) => Val::Int(*i),
            Literal::Double(d) => Val::Float(*d),
            Literal::Bool(b) => Val::Bool(*b),
            Literal::Null => Val::Null,
        }
    }
}

fn holds(op: CompareOp, ord: Ordering) -> bool {
    match op {
        CompareOp::Eq => ord == Ordering::Equal,
        CompareOp::Ne => ord != Ordering::Equal,
        CompareOp::Lt => ord == Ordering::Less,
        CompareOp::Le => ord != Ordering::Greater,
        CompareOp::Gt => ord == Ordering::Greater,
        CompareOp::Ge => ord != Ordering::Less,
    }
}

/// Exact comparison of an integer (anything from `i64::MIN` to `u64::MAX`) with a double.
fn cmp_int_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    if f >= 18_446_744_073_709_551_616.0 {
        return Some(Ordering::Less); // 2^64 and above: beyond every u64
    }
    if f < -9_223_372_036_854_775_808.0 {
        return Some(Ordering::Greater); // below i64::MIN
    }
    let whole = f.trunc();
    match i.cmp(&(whole as i128)) {
        Ordering::Equal => whole.partial_cmp(&f),
        other => Some(other),
    }
}

/// Numeric order across `i64`, `u64` and `f64`; `None` unless both are numbers.
pub(crate) fn cmp_numbers(a: Val<'_>, b: Val<'_>) -> Option<Ordering> {
    enum Num {
        Int(i128),
        Float(f64),
    }
    let num = |v| match v {
        Val::Int(i) => Some(Num::Int(i.into())),
        Val::UInt(u) => Some(Num::Int(u.into())),
        Val::Float(f) => Some(Num::Float(f)),
        _ => None,
    };
    match (num(a)?, num(b)?) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y),
        (Num::Int(x), Num::Float(y)) => cmp_int_float(x, y),
        (Num::Float(x), Num::Int(y)) => cmp_int_float(y, x).map(Ordering::reverse),
    }
}

/// A comparison, under twinroute's two-valued semantics (see `docs/filter-language.md`):
/// a missing operand makes it false; null equals only null (so `x != null` is a presence test);
/// strings compare by bytes, numbers numerically, booleans only with `=`/`!=`; any other pair of
/// types makes it false, `!=` included.
#[inline]
pub(crate) fn compare(op: CompareOp, a: Val<'_>, b: Val<'_>) -> bool {
    match (a, b) {
        (Val::Missing, _) | (_, Val::Missing) => false,
        (Val::Null, Val::Null) => op == CompareOp::Eq,
        (Val::Null, _) | (_, Val::Null) => op == CompareOp::Ne,
        (Val::Str(x), Val::Str(y)) => match op {
            // Equality compares lengths first.
            CompareOp::Eq => x == y,
            CompareOp::Ne => x != y,
            _ => holds(op, x.cmp(y)),
        },
        (Val::Bool(x), Val::Bool(y)) => match op {
            CompareOp::Eq => x == y,
            CompareOp::Ne => x != y,
            _ => false,
        },
        _ => cmp_numbers(a, b).is_some_and(|ord| holds(op, ord)),
    }
}

/// A string function: false unless both arguments are strings. Case-sensitive, byte-wise.
#[inline]
pub(crate) fn call(func: Function, a: Val<'_>, b: Val<'_>) -> bool {
    match (a, b) {
        (Val::Str(x), Val::Str(y)) => match func {
            Function::StartsWith => x.starts_with(y),
            Function::EndsWith => x.ends_with(y),
            Function::Contains => x.contains(y),
        },
        _ => false,
    }
}

/// The JSON text of an event's body, when it has one.
pub(crate) fn json_body(event: &CloudEvent) -> Option<&[u8]> {
    event.data().filter(|d| d.encoding == DataEncoding::Json).map(|d| &d.bytes[..])
}

/// Per-attribute dictionaries of the string literals that filters compare attributes with using
/// `=` or `!=`. An event's attribute is looked up once (on first use) and those comparisons become
/// integer comparisons: a table whose routes test `type` thirty times reads it once.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dictionaries {
    by_attribute: [HashMap<Box<str>, u32, BuildHasherDefault<WordHash>>; ATTRIBUTES],
}

/// How many `Attribute` variants there are (the dictionaries and the per-event cache are indexed
/// by `attribute as usize`).
const ATTRIBUTES: usize = Attribute::ALL.len();

/// The per-event cache of dictionary lookups: not looked up yet.
const UNKNOWN: u32 = u32::MAX;
/// The event does not carry the attribute.
const ABSENT: u32 = u32::MAX - 1;
/// The event carries a value no filter compares with.
const OTHER: u32 = u32::MAX - 2;

impl Dictionaries {
    fn intern(&mut self, attribute: Attribute, value: &str) -> u32 {
        let dict = &mut self.by_attribute[attribute as usize];
        let next = dict.len() as u32;
        *dict.entry(value.into()).or_insert(next)
    }

    fn lookup(&self, attribute: Attribute, value: Option<&str>) -> u32 {
        match value {
            None => ABSENT,
            Some(v) => self.by_attribute[attribute as usize].get(v).copied().unwrap_or(OTHER),
        }
    }
}

/// A word-at-a-time multiplicative hash (FxHash's): dictionary keys come from route filters and
/// are compared in full on a hit, so a fast non-keyed hash is fine, and hashing a 40-byte `type`
/// costs a few nanoseconds per event.
#[derive(Default)]
struct WordHash(u64);

impl Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(<[u8; 8]>::try_from(chunk).unwrap_or_default());
            h = (h.rotate_left(5) ^ word).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        h = (h.rotate_left(5) ^ u64::from_le_bytes(tail) ^ bytes.len() as u64).wrapping_mul(K);
        self.0 = h;
    }
}

/// What compiled conditions refer to: the `$body` paths to extract and the attribute dictionaries.
/// One per filter when it is evaluated on its own; one per route table, shared by all its routes,
/// so the body is scanned and each attribute looked up once per event.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shared {
    trie: PathTrie,
    dictionaries: Dictionaries,
}

impl Shared {
    pub(crate) fn trie(&self) -> &PathTrie {
        &self.trie
    }

    /// Only `$body` paths (for explanations, which do not use dictionaries).
    pub(crate) fn with_trie(mut trie: PathTrie) -> Shared {
        trie.finish();
        Shared { trie, dictionaries: Dictionaries::default() }
    }
}

/// Compiles filters against one [`Shared`].
pub(crate) struct Compiler {
    shared: Shared,
    /// Compare attributes by dictionary id. Pays off when many filters share the per-event
    /// lookups (a route table); for one filter a direct string comparison is cheaper than a hash.
    dictionaries: bool,
}

impl Compiler {
    /// For one filter evaluated on its own.
    pub(crate) fn standalone() -> Compiler {
        Compiler { shared: Shared::default(), dictionaries: false }
    }

    /// For the filters of a route table, evaluated together on each event.
    pub(crate) fn table() -> Compiler {
        Compiler { shared: Shared::default(), dictionaries: true }
    }

    /// Simplifies and compiles a tree.
    pub(crate) fn add(&mut self, expr: &Expr) -> Compiled {
        let root = self.lower(&fold(expr));
        let (guard, root) = split_guard(root);
        Compiled { guard, root }
    }

    pub(crate) fn finish(mut self) -> Shared {
        self.shared.trie.finish();
        self.shared
    }

    fn operand(&mut self, operand: &Operand) -> Opnd {
        match operand {
            Operand::Field(Field::Attribute(a)) => Opnd::Attr(*a),
            Operand::Field(Field::Body(path)) => Opnd::Body(self.shared.trie.insert(path)),
            Operand::Literal(Literal::String(s)) => Opnd::Str(s.as_str().into()),
            Operand::Literal(Literal::Integer(i)) => Opnd::Int(*i),
            Operand::Literal(Literal::Double(d)) => Opnd::Float(*d),
            Operand::Literal(Literal::Bool(b)) => Opnd::Bool(*b),
            Operand::Literal(Literal::Null) => Opnd::Null,
        }
    }

    fn lower(&mut self, expr: &Expr) -> Node {
        match expr {
            Expr::Const(b) => Node::Const(*b),
            Expr::And(items) => Node::And(items.iter().map(|e| self.lower(e)).collect()),
            Expr::Or(items) => Node::Or(items.iter().map(|e| self.lower(e)).collect()),
            Expr::Not(inner) => Node::Not(Box::new(self.lower(inner))),
            Expr::Compare { op, left, right } => {
                let (mut op, mut left, mut right) = (*op, self.operand(left), self.operand(right));
                // Field on the left, literal on the right: `5 < $body.x` is `$body.x > 5`.
                if left.is_literal() && !right.is_literal() {
                    std::mem::swap(&mut left, &mut right);
                    op = mirror(op);
                }
                match (left, right) {
                    (Opnd::Attr(attr), Opnd::Str(lit)) if matches!(op, CompareOp::Eq | CompareOp::Ne) => {
                        let ne = op == CompareOp::Ne;
                        if self.dictionaries {
                            Node::AttrEq { attr, id: self.shared.dictionaries.intern(attr, &lit), ne }
                        } else {
                            Node::AttrStrEq { attr, lit, ne }
                        }
                    }
                    (Opnd::Attr(attr), Opnd::Str(lit)) => Node::AttrOrder { attr, op, lit },
                    (Opnd::Body(slot), right) if right.is_literal() => Node::BodyLit { slot, op, lit: right },
                    (left, right) => Node::Compare { op, left, right },
                }
            }
            Expr::Call { func, left, right } => match (self.operand(left), self.operand(right)) {
                (Opnd::Attr(attr), Opnd::Str(needle)) => {
                    Node::AttrCall { attr, needle: Needle::new(*func, needle) }
                }
                (Opnd::Body(slot), Opnd::Str(needle)) => {
                    Node::BodyCall { slot, needle: Needle::new(*func, needle) }
                }
                (left, right) => Node::Call { func: *func, left, right },
            },
        }
    }
}

/// `a op b` is `b mirror(op) a`.
fn mirror(op: CompareOp) -> CompareOp {
    match op {
        CompareOp::Lt => CompareOp::Gt,
        CompareOp::Le => CompareOp::Ge,
        CompareOp::Gt => CompareOp::Lt,
        CompareOp::Ge => CompareOp::Le,
        other => other,
    }
}

/// Slots held in the [`Env`] itself, without allocating: filters and tables rarely read more
/// `$body` paths than this.
const INLINE_SLOTS: usize = 16;

/// The `$body` values of an evaluation, by slot number.
// Large on purpose: it lives on the stack of one evaluation, and the point is not to allocate.
#[allow(clippy::large_enum_variant)]
enum Slots<'e> {
    /// No condition has needed the body yet.
    Unread,
    Inline([Slot<'e>; INLINE_SLOTS]),
    /// The body was parsed already (`CloudEvent::body`): paths are looked up in it on demand.
    Parsed(&'e serde_json::Value),
    /// No JSON body.
    Absent,
    /// More paths than [`INLINE_SLOTS`]: one allocation per event.
    Heap(Vec<Slot<'e>>),
}

/// What an evaluation reads from: the event, `$body` values extracted on first use, and the
/// dictionary ids of attributes, looked up on first use.
pub(crate) struct Env<'e> {
    event: &'e CloudEvent,
    shared: &'e Shared,
    /// Filled on first `$body` read.
    slots: Slots<'e>,
    /// Per attribute: [`UNKNOWN`], [`ABSENT`], [`OTHER`] or the id of its value.
    ids: [u32; ATTRIBUTES],
}

impl<'e> Env<'e> {
    pub(crate) fn new(event: &'e CloudEvent, shared: &'e Shared) -> Self {
        Env { event, shared, slots: Slots::Unread, ids: [UNKNOWN; ATTRIBUTES] }
    }

    pub(crate) fn event(&self) -> &'e CloudEvent {
        self.event
    }

    /// Scans the body for every path of the trie, once.
    #[inline]
    pub(crate) fn extract(&mut self) {
        if matches!(self.slots, Slots::Unread) {
            self.extract_now();
        }
    }

    #[cold]
    fn extract_now(&mut self) {
        match self.event.parsed_body() {
            Some(Some(value)) => {
                self.slots = Slots::Parsed(value);
                return;
            }
            Some(None) => {
                self.slots = Slots::Absent;
                return;
            }
            None => {}
        }
        let Some(json) = json_body(self.event) else {
            self.slots = Slots::Absent;
            return;
        };
        let count = self.shared.trie.slot_count();
        self.slots = if count <= INLINE_SLOTS {
            Slots::Inline(std::array::from_fn(|_| Slot::Missing))
        } else {
            Slots::Heap(vec![Slot::Missing; count])
        };
        let slots = match &mut self.slots {
            Slots::Inline(inline) => &mut inline[..count],
            Slots::Heap(heap) => &mut heap[..],
            _ => return,
        };
        self.shared.trie.extract(json, slots);
    }

    /// The value in a slot; [`Env::extract`] must have run.
    #[inline]
    pub(crate) fn slot(&self, slot: SlotId) -> Val<'_> {
        let found = match &self.slots {
            Slots::Inline(inline) => inline.get(slot as usize),
            Slots::Heap(heap) => heap.get(slot as usize),
            Slots::Parsed(body) => {
                return lookup_parsed(body, self.shared.trie.path(slot)).map_or(Val::Missing, Val::from_json)
            }
            Slots::Unread | Slots::Absent => None,
        };
        found.map_or(Val::Missing, Val::from_slot)
    }

    #[inline]
    fn attribute(&self, attribute: Attribute) -> Val<'e> {
        self.event.attribute(attribute).map_or(Val::Missing, Val::Str)
    }

    /// The dictionary id of an attribute's value.
    #[inline(always)]
    fn id(&mut self, attribute: Attribute) -> u32 {
        let cached = self.ids[attribute as usize];
        if cached != UNKNOWN {
            return cached;
        }
        let id = self.shared.dictionaries.lookup(attribute, self.event.attribute(attribute));
        self.ids[attribute as usize] = id;
        id
    }
}

/// A compiled operand.
#[derive(Debug, Clone)]
enum Opnd {
    Attr(Attribute),
    /// A `$body` path, by slot number in the [`Shared`] trie.
    Body(SlotId),
    Str(Box<str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Opnd {
    #[inline]
    fn value<'v>(&'v self, env: &'v Env<'_>) -> Val<'v> {
        match self {
            Opnd::Attr(a) => env.attribute(*a),
            Opnd::Body(slot) => env.slot(*slot),
            other => other.literal(),
        }
    }

    /// The value of a literal operand (`Missing` for fields).
    #[inline]
    fn literal(&self) -> Val<'_> {
        match self {
            Opnd::Str(s) => Val::Str(s),
            Opnd::Int(i) => Val::Int(*i),
            Opnd::Float(f) => Val::Float(*f),
            Opnd::Bool(b) => Val::Bool(*b),
            Opnd::Null => Val::Null,
            Opnd::Attr(_) | Opnd::Body(_) => Val::Missing,
        }
    }

    fn is_body(&self) -> bool {
        matches!(self, Opnd::Body(_))
    }

    fn is_literal(&self) -> bool {
        !matches!(self, Opnd::Attr(_) | Opnd::Body(_))
    }
}

/// The literal second argument of a string function, prepared for searching.
#[derive(Debug, Clone)]
struct Needle {
    func: Function,
    text: Box<str>,
    /// For `CONTAINS`: a substring searcher built once (`str::contains` builds one per call).
    /// Boxed: a finder is a few hundred bytes, and nodes are kept small for cache locality.
    finder: Option<Box<memmem::Finder<'static>>>,
}

impl Needle {
    fn new(func: Function, text: Box<str>) -> Needle {
        let finder =
            (func == Function::Contains).then(|| Box::new(memmem::Finder::new(text.as_bytes()).into_owned()));
        Needle { func, text, finder }
    }

    /// `FUNC(haystack, needle)`. The first (last) byte is compared before the rest: most
    /// haystacks differ there, and it saves a `memcmp` call.
    #[inline]
    fn test(&self, haystack: &str) -> bool {
        let (hay, needle) = (haystack.as_bytes(), self.text.as_bytes());
        match self.func {
            Function::StartsWith => match needle.first() {
                None => true,
                Some(first) => hay.first() == Some(first) && hay.starts_with(needle),
            },
            Function::EndsWith => match needle.last() {
                None => true,
                Some(last) => hay.last() == Some(last) && hay.ends_with(needle),
            },
            Function::Contains => self.finder.as_ref().is_some_and(|f| f.find(hay).is_some()),
        }
    }
}

/// A compiled condition. The specialized leaves cover what route filters are made of.
#[derive(Debug, Clone)]
enum Node {
    Const(bool),
    And(Box<[Node]>),
    Or(Box<[Node]>),
    Not(Box<Node>),
    /// `attr = 'lit'` / `attr != 'lit'`, by dictionary id (in a route table).
    AttrEq {
        attr: Attribute,
        id: u32,
        ne: bool,
    },
    /// `attr = 'lit'` / `attr != 'lit'` by string comparison (a filter on its own).
    AttrStrEq {
        attr: Attribute,
        lit: Box<str>,
        ne: bool,
    },
    /// `attr < 'lit'` and the other orderings.
    AttrOrder {
        attr: Attribute,
        op: CompareOp,
        lit: Box<str>,
    },
    /// `FUNC(attr, 'lit')`.
    AttrCall {
        attr: Attribute,
        needle: Needle,
    },
    /// `FUNC($body.path, 'lit')`.
    BodyCall {
        slot: SlotId,
        needle: Needle,
    },
    /// `$body.path op literal`.
    BodyLit {
        slot: SlotId,
        op: CompareOp,
        lit: Opnd,
    },
    /// Anything else: fields on both sides, literal haystacks.
    Compare {
        op: CompareOp,
        left: Opnd,
        right: Opnd,
    },
    Call {
        func: Function,
        left: Opnd,
        right: Opnd,
    },
}

impl Node {
    /// Evaluates a node; `AND`/`OR`/`NOT` recurse through [`Node::eval`], leaves are evaluated
    /// in place (a leaf in an `AND` costs no call).
    #[inline(always)]
    fn eval_inline(&self, env: &mut Env<'_>) -> bool {
        match self {
            Node::Const(b) => *b,
            Node::And(_) | Node::Or(_) | Node::Not(_) => self.eval(env),
            Node::AttrEq { attr, id, ne } => {
                let value = env.id(*attr);
                value != ABSENT && ((value == *id) != *ne)
            }
            Node::AttrStrEq { attr, lit, ne } => match env.event.attribute(*attr) {
                Some(value) => (value == &**lit) != *ne,
                None => false,
            },
            Node::AttrOrder { attr, op, lit } => match env.event.attribute(*attr) {
                Some(value) => holds(*op, value.cmp(lit)),
                None => false,
            },
            Node::AttrCall { attr, needle } => match env.event.attribute(*attr) {
                Some(value) => needle.test(value),
                None => false,
            },
            Node::BodyCall { slot, needle } => {
                env.extract();
                match env.slot(*slot) {
                    Val::Str(value) => needle.test(value),
                    _ => false,
                }
            }
            Node::BodyLit { slot, op, lit } => {
                env.extract();
                compare(*op, env.slot(*slot), lit.literal())
            }
            Node::Compare { op, left, right } => {
                if left.is_body() || right.is_body() {
                    env.extract();
                }
                compare(*op, left.value(env), right.value(env))
            }
            Node::Call { func, left, right } => {
                if left.is_body() || right.is_body() {
                    env.extract();
                }
                call(*func, left.value(env), right.value(env))
            }
        }
    }

    fn eval(&self, env: &mut Env<'_>) -> bool {
        match self {
            Node::And(items) => items.iter().all(|n| n.eval_inline(env)),
            Node::Or(items) => items.iter().any(|n| n.eval_inline(env)),
            Node::Not(inner) => !inner.eval_inline(env),
            leaf => leaf.eval_inline(env),
        }
    }
}

/// One compiled filter; evaluated with an [`Env`] over the [`Shared`] it was compiled against.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    root: Node,
    /// A condition the filter requires, as a bitmask: the filter can only match when the
    /// attribute's dictionary id is one of the bits. From `attr = 'a'` or `(attr = 'a' OR attr =
    /// 'b')` at the top level (alone or as an operand of the top-level `AND`), then taken out of
    /// `root`. In a route table this rejects, say, every telemetry route for a twin event with one
    /// bit test.
    guard: Option<(Attribute, u64)>,
}

/// Splits off the required `attr = one of` condition of a tree, if it has one with ids below 64:
/// returns it as a bitmask and the rest of the tree, which no longer needs to test it.
fn split_guard(root: Node) -> (Option<(Attribute, u64)>, Node) {
    fn one(node: &Node) -> Option<(Attribute, u64)> {
        match node {
            Node::AttrEq { attr, id, ne: false } if *id < 64 => Some((*attr, 1 << id)),
            Node::Or(items) => {
                let (attr, mut mask) = one(items.first()?)?;
                for item in &items[1..] {
                    match one(item)? {
                        (a, m) if a == attr => mask |= m,
                        _ => return None,
                    }
                }
                Some((attr, mask))
            }
            _ => None,
        }
    }
    match root {
        Node::And(items) => {
            let Some((at, guard)) = items.iter().enumerate().find_map(|(i, n)| one(n).map(|g| (i, g))) else {
                return (None, Node::And(items));
            };
            let mut rest = items.into_vec();
            rest.remove(at);
            let rest = if rest.len() == 1 { rest.pop().expect("one item") } else { Node::And(rest.into()) };
            (Some(guard), rest)
        }
        other => match one(&other) {
            Some(guard) => (Some(guard), Node::Const(true)),
            None => (None, other),
        },
    }
}

impl Compiled {
    /// `Some(b)` when the filter simplified to a constant.
    pub(crate) fn constant(&self) -> Option<bool> {
        match (self.guard, &self.root) {
            (None, Node::Const(b)) => Some(*b),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn eval(&self, env: &mut Env<'_>) -> bool {
        if let Some((attr, mask)) = self.guard {
            let id = env.id(attr);
            if id >= 64 || mask & (1 << id) == 0 {
                return false;
            }
        }
        self.root.eval_inline(env)
    }
}

/// A filter compiled on its own.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    compiled: Compiled,
    shared: Shared,
}

impl Program {
    pub(crate) fn compile(expr: &Expr) -> Program {
        let mut compiler = Compiler::standalone();
        let compiled = compiler.add(expr);
        Program { compiled, shared: compiler.finish() }
    }

    pub(crate) fn constant(&self) -> Option<bool> {
        self.compiled.constant()
    }

    #[inline]
    pub(crate) fn matches(&self, event: &CloudEvent) -> bool {
        if let Some(b) = self.compiled.constant() {
            return b;
        }
        let mut env = Env::new(event, &self.shared);
        self.compiled.eval(&mut env)
    }
}

/// Whether a field is a context attribute every event carries.
fn always_present(attribute: Attribute) -> bool {
    matches!(attribute, Attribute::Id | Attribute::Source | Attribute::Type | Attribute::SpecVersion)
}

/// What an operand is known to be before seeing the event.
enum Known<'a> {
    Literal(&'a Literal),
    /// An attribute: a string when present.
    Attribute(Attribute),
    Body,
}

fn known(operand: &Operand) -> Known<'_> {
    match operand {
        Operand::Literal(l) => Known::Literal(l),
        Operand::Field(Field::Attribute(a)) => Known::Attribute(*a),
        Operand::Field(Field::Body(_)) => Known::Body,
    }
}

/// `specversion` is always `1.0` (the parsers refuse anything else).
fn substitute(operand: &Operand) -> Operand {
    match operand {
        Operand::Field(Field::Attribute(Attribute::SpecVersion)) => {
            Operand::Literal(Literal::String(SPEC_VERSION.into()))
        }
        other => other.clone(),
    }
}

/// Evaluation cost class: 0 constant, 1 attributes only, 2 reads the body.
fn cost(expr: &Expr) -> u8 {
    match expr {
        Expr::Const(_) => 0,
        Expr::And(items) | Expr::Or(items) => items.iter().map(cost).max().unwrap_or(0),
        Expr::Not(inner) => cost(inner),
        Expr::Compare { left, right, .. } | Expr::Call { left, right, .. } => {
            if left.reads_body() || right.reads_body() {
                2
            } else {
                1
            }
        }
    }
}

/// The comparison's result when it does not depend on the event.
fn fold_compare(op: CompareOp, left: &Operand, right: &Operand) -> Option<bool> {
    match (known(left), known(right)) {
        (Known::Literal(a), Known::Literal(b)) => {
            Some(compare(op, Val::from_literal(a), Val::from_literal(b)))
        }
        (Known::Attribute(a), Known::Literal(l)) | (Known::Literal(l), Known::Attribute(a)) => {
            match l {
                Literal::String(_) => None,
                // Present: a string, never null; absent: false either way.
                Literal::Null if always_present(a) => Some(op == CompareOp::Ne),
                Literal::Null => None,
                // A string never compares with a number or a boolean.
                _ => Some(false),
            }
        }
        _ => None,
    }
}

/// The call's result when it does not depend on the event.
fn fold_call(func: Function, left: &Operand, right: &Operand) -> Option<bool> {
    let non_string = |o: &Operand| matches!(o, Operand::Literal(l) if !matches!(l, Literal::String(_)));
    if non_string(left) || non_string(right) {
        return Some(false);
    }
    match (left, right) {
        (Operand::Literal(a), Operand::Literal(b)) => {
            Some(call(func, Val::from_literal(a), Val::from_literal(b)))
        }
        _ => None,
    }
}

/// Simplifies a tree without changing what it matches.
fn fold(expr: &Expr) -> Expr {
    match expr {
        Expr::Const(b) => Expr::Const(*b),
        Expr::And(items) | Expr::Or(items) => {
            let is_and = matches!(expr, Expr::And(_));
            // AND: `true` operands drop out and `false` decides; OR the other way round.
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match fold(item) {
                    Expr::Const(b) if b == is_and => {}
                    Expr::Const(b) => return Expr::Const(b),
                    Expr::And(inner) if is_and => out.extend(inner),
                    Expr::Or(inner) if !is_and => out.extend(inner),
                    other => out.push(other),
                }
            }
            match out.len() {
                0 => Expr::Const(is_and),
                1 => out.pop().expect("one item"),
                _ => {
                    out.sort_by_key(cost);
                    if is_and {
                        Expr::And(out)
                    } else {
                        Expr::Or(out)
                    }
                }
            }
        }
        Expr::Not(inner) => match fold(inner) {
            Expr::Const(b) => Expr::Const(!b),
            Expr::Not(inner) => *inner,
            other => Expr::Not(Box::new(other)),
        },
        Expr::Compare { op, left, right } => {
            let (left, right) = (substitute(left), substitute(right));
            match fold_compare(*op, &left, &right) {
                Some(b) => Expr::Const(b),
                None => Expr::Compare { op: *op, left, right },
            }
        }
        Expr::Call { func, left, right } => {
            let (left, right) = (substitute(left), substitute(right));
            match fold_call(*func, &left, &right) {
                Some(b) => Expr::Const(b),
                None => Expr::Call { func: *func, left, right },
            }
        }
    }
}
