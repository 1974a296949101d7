//! The compiled form of a filter and its evaluation.
//!
//! Compiling folds what does not depend on the event (literal-only comparisons, `specversion`,
//! which is always `1.0`, attributes compared with numbers or booleans, `true`/`false` inside
//! `AND`/`OR`/`NOT`), flattens nested `AND`s and `OR`s, and puts conditions on context attributes
//! before those reading `$body`, so the body is only scanned when the attributes did not decide.
//! Evaluation is two-valued and has no side effects, so the order is not observable.
//! Nothing allocates while evaluating, except decoding a `$body` string that has JSON escapes.

use super::ast::{CompareOp, Expr, Field, Function, Literal, Operand};
use super::body::{PathTrie, Slot};
use crate::event::{Attribute, CloudEvent, DataEncoding, SPEC_VERSION};
use smallvec::SmallVec;
use std::cmp::Ordering;

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
        (Val::Str(x), Val::Str(y)) => holds(op, x.cmp(y)),
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
    event
        .data()
        .filter(|d| d.encoding == DataEncoding::Json)
        .map(|d| &d.bytes[..])
}

/// What an evaluation reads from: the event, and `$body` values extracted on first use.
pub(crate) struct Env<'e> {
    event: &'e CloudEvent,
    trie: &'e PathTrie,
    /// Filled on first `$body` read; empty before.
    slots: SmallVec<[Slot<'e>; 16]>,
    extracted: bool,
}

impl<'e> Env<'e> {
    pub(crate) fn new(event: &'e CloudEvent, trie: &'e PathTrie) -> Self {
        Env {
            event,
            trie,
            slots: SmallVec::new(),
            extracted: false,
        }
    }

    pub(crate) fn event(&self) -> &'e CloudEvent {
        self.event
    }

    /// Scans the body for every path of the trie, once.
    #[inline]
    pub(crate) fn extract(&mut self) {
        if !self.extracted {
            self.extracted = true;
            self.slots.resize(self.trie.slot_count(), Slot::Missing);
            if let Some(json) = json_body(self.event) {
                self.trie.extract(json, &mut self.slots);
            }
        }
    }

    /// The value in a slot; [`Env::extract`] must have run.
    #[inline]
    pub(crate) fn slot(&self, slot: u16) -> Val<'_> {
        self.slots
            .get(slot as usize)
            .map_or(Val::Missing, Val::from_slot)
    }

    #[inline]
    fn attribute(&self, attribute: Attribute) -> Val<'e> {
        self.event.attribute(attribute).map_or(Val::Missing, Val::Str)
    }
}

/// A compiled operand.
#[derive(Debug, Clone)]
enum Opnd {
    Attr(Attribute),
    /// A `$body` path, by the filter's own slot number (mapped to the table's by the caller).
    Body(u16),
    Str(Box<str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Opnd {
    #[inline]
    fn value<'v>(&'v self, env: &'v Env<'_>, map: &[u16]) -> Val<'v> {
        match self {
            Opnd::Attr(a) => env.attribute(*a),
            Opnd::Body(slot) => env.slot(map[*slot as usize]),
            Opnd::Str(s) => Val::Str(s),
            Opnd::Int(i) => Val::Int(*i),
            Opnd::Float(f) => Val::Float(*f),
            Opnd::Bool(b) => Val::Bool(*b),
            Opnd::Null => Val::Null,
        }
    }

    fn is_body(&self) -> bool {
        matches!(self, Opnd::Body(_))
    }
}

/// A compiled condition.
#[derive(Debug, Clone)]
enum Node {
    Const(bool),
    And(Box<[Node]>),
    Or(Box<[Node]>),
    Not(Box<Node>),
    Compare {
        op: CompareOp,
        left: Opnd,
        right: Opnd,
        body: bool,
    },
    Call {
        func: Function,
        left: Opnd,
        right: Opnd,
        body: bool,
    },
}

impl Node {
    fn eval(&self, env: &mut Env<'_>, map: &[u16]) -> bool {
        match self {
            Node::Const(b) => *b,
            Node::And(items) => items.iter().all(|n| n.eval(env, map)),
            Node::Or(items) => items.iter().any(|n| n.eval(env, map)),
            Node::Not(inner) => !inner.eval(env, map),
            Node::Compare {
                op,
                left,
                right,
                body,
            } => {
                if *body {
                    env.extract();
                }
                compare(*op, left.value(env, map), right.value(env, map))
            }
            Node::Call {
                func,
                left,
                right,
                body,
            } => {
                if *body {
                    env.extract();
                }
                call(*func, left.value(env, map), right.value(env, map))
            }
        }
    }
}

/// A filter ready to evaluate.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    root: Node,
    /// The `$body` paths the compiled tree reads, by slot number.
    paths: Box<[Box<[Box<str>]>]>,
    /// The same paths as a trie, for evaluating the filter on its own.
    trie: PathTrie,
    /// `0..paths.len()`: the slot map when the filter is evaluated on its own.
    identity: Box<[u16]>,
    constant: Option<bool>,
}

impl Program {
    pub(crate) fn compile(expr: &Expr) -> Program {
        let folded = fold(expr);
        let mut trie = PathTrie::default();
        let root = lower(&folded, &mut trie);
        trie.finish();
        let mut paths: Vec<Box<[Box<str>]>> = vec![Box::default(); trie.slot_count()];
        folded.for_each_operand(&mut |o| {
            if let Operand::Field(Field::Body(path)) = o {
                let slot = trie.lookup(path).expect("inserted while lowering");
                paths[slot as usize] = path.iter().map(|s| s.as_str().into()).collect();
            }
        });
        let identity = (0..paths.len() as u16).collect();
        let constant = match root {
            Node::Const(b) => Some(b),
            _ => None,
        };
        Program {
            root,
            paths: paths.into_boxed_slice(),
            trie,
            identity,
            constant,
        }
    }

    pub(crate) fn constant(&self) -> Option<bool> {
        self.constant
    }

    /// The body paths, by this program's slot numbers.
    pub(crate) fn paths(&self) -> &[Box<[Box<str>]>] {
        &self.paths
    }

    /// Evaluates the filter on its own.
    #[inline]
    pub(crate) fn matches(&self, event: &CloudEvent) -> bool {
        if let Some(b) = self.constant {
            return b;
        }
        let mut env = Env::new(event, &self.trie);
        self.root.eval(&mut env, &self.identity)
    }

    /// Evaluates the filter within a route table: `env` holds the table's extraction and `map`
    /// turns this program's slot numbers into the table's.
    #[inline]
    pub(crate) fn eval_in(&self, env: &mut Env<'_>, map: &[u16]) -> bool {
        self.root.eval(env, map)
    }
}

/// Whether a field is a context attribute every event carries.
fn always_present(attribute: Attribute) -> bool {
    matches!(
        attribute,
        Attribute::Id | Attribute::Source | Attribute::Type | Attribute::SpecVersion
    )
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
        (Known::Literal(a), Known::Literal(b)) => Some(compare(
            op,
            Val::from_literal(a),
            Val::from_literal(b),
        )),
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
        (Operand::Literal(a), Operand::Literal(b)) => Some(call(
            func,
            Val::from_literal(a),
            Val::from_literal(b),
        )),
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
                None => Expr::Compare {
                    op: *op,
                    left,
                    right,
                },
            }
        }
        Expr::Call { func, left, right } => {
            let (left, right) = (substitute(left), substitute(right));
            match fold_call(*func, &left, &right) {
                Some(b) => Expr::Const(b),
                None => Expr::Call {
                    func: *func,
                    left,
                    right,
                },
            }
        }
    }
}

fn lower_operand(operand: &Operand, trie: &mut PathTrie) -> Opnd {
    match operand {
        Operand::Field(Field::Attribute(a)) => Opnd::Attr(*a),
        Operand::Field(Field::Body(path)) => Opnd::Body(trie.insert(path)),
        Operand::Literal(Literal::String(s)) => Opnd::Str(s.as_str().into()),
        Operand::Literal(Literal::Integer(i)) => Opnd::Int(*i),
        Operand::Literal(Literal::Double(d)) => Opnd::Float(*d),
        Operand::Literal(Literal::Bool(b)) => Opnd::Bool(*b),
        Operand::Literal(Literal::Null) => Opnd::Null,
    }
}

fn lower(expr: &Expr, trie: &mut PathTrie) -> Node {
    match expr {
        Expr::Const(b) => Node::Const(*b),
        Expr::And(items) => Node::And(items.iter().map(|e| lower(e, trie)).collect()),
        Expr::Or(items) => Node::Or(items.iter().map(|e| lower(e, trie)).collect()),
        Expr::Not(inner) => Node::Not(Box::new(lower(inner, trie))),
        Expr::Compare { op, left, right } => {
            let (left, right) = (lower_operand(left, trie), lower_operand(right, trie));
            Node::Compare {
                op: *op,
                body: left.is_body() || right.is_body(),
                left,
                right,
            }
        }
        Expr::Call { func, left, right } => {
            let (left, right) = (lower_operand(left, trie), lower_operand(right, trie));
            Node::Call {
                func: *func,
                body: left.is_body() || right.is_body(),
                left,
                right,
            }
        }
    }
}
