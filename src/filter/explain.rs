//! Why a filter did or did not match an event, clause by clause (`twinroute route explain`).
//!
//! Explaining evaluates the parsed tree as written (no folding, no reordering, no short-circuit),
//! so every clause gets a result; the result of the whole agrees with [`Filter::matches`].
//!
//! [`Filter::matches`]: super::Filter::matches

use super::ast::{CompareOp, Expr, Field, Function, Operand};
use super::body::PathTrie;
use super::eval::{call, compare, json_body, Env, Shared, Val};
use crate::event::CloudEvent;
use serde::Serialize;
use std::fmt;

/// The result of a filter on one event, with the result of every clause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Whether the filter matched.
    pub matched: bool,
    /// Every condition of the filter in pre-order: the whole filter first (depth 0), then its
    /// operands, and so on down to the comparisons and calls.
    pub clauses: Vec<Clause>,
}

/// One condition of a filter and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clause {
    /// Nesting depth: 0 for the whole filter.
    pub depth: usize,
    /// The condition's canonical text.
    pub text: String,
    pub result: bool,
    /// For comparisons and calls, what the fields held and why that gives the result, e.g.
    /// "$body.temperature is 21.5" or "the event has no subject". Empty for `AND`/`OR`/`NOT`.
    pub reason: String,
}

impl fmt::Display for Explanation {
    /// One line per clause, indented by depth: "`<clause>` is true|false: <reason>".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, clause) in self.clauses.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            let verdict = if clause.result { "true" } else { "false" };
            write!(f, "{:indent$}`{}` is {verdict}", "", clause.text, indent = clause.depth * 2)?;
            if !clause.reason.is_empty() {
                write!(f, ": {}", clause.reason)?;
            }
        }
        Ok(())
    }
}

/// Explains `expr` on `event`.
pub(crate) fn explain(expr: &Expr, event: &CloudEvent) -> Explanation {
    let mut trie = PathTrie::default();
    expr.for_each_operand(&mut |o| {
        if let Operand::Field(Field::Body(path)) = o {
            // Prefixes too, to say which step of a missing path is missing.
            for len in 0..=path.len() {
                trie.insert(&path[..len]);
            }
        }
    });
    let shared = Shared::with_trie(trie);
    let mut env = Env::new(event, &shared);
    env.extract();
    let mut explainer = Explainer { env: &env, trie: shared.trie(), clauses: Vec::new() };
    let matched = explainer.walk(expr, 0);
    Explanation { matched, clauses: explainer.clauses }
}

struct Explainer<'a, 'e> {
    env: &'a Env<'e>,
    trie: &'a PathTrie,
    clauses: Vec<Clause>,
}

impl Explainer<'_, '_> {
    fn walk(&mut self, expr: &Expr, depth: usize) -> bool {
        let index = self.clauses.len();
        self.clauses.push(Clause { depth, text: expr.to_string(), result: false, reason: String::new() });
        let (result, reason) = match expr {
            Expr::Const(b) => (*b, "always".to_owned()),
            Expr::And(items) => {
                let results: Vec<bool> = items.iter().map(|e| self.walk(e, depth + 1)).collect();
                (results.iter().all(|r| *r), String::new())
            }
            Expr::Or(items) => {
                let results: Vec<bool> = items.iter().map(|e| self.walk(e, depth + 1)).collect();
                (results.iter().any(|r| *r), String::new())
            }
            Expr::Not(inner) => (!self.walk(inner, depth + 1), String::new()),
            Expr::Compare { op, left, right } => {
                let (a, b) = (self.value(left), self.value(right));
                let result = compare(*op, a, b);
                let mut reason = self.describe(left, a, right, b);
                if !result {
                    if let Some(why) = compare_failure(*op, a, b) {
                        reason.push_str(why);
                    }
                }
                (result, reason)
            }
            Expr::Call { func, left, right } => {
                let (a, b) = (self.value(left), self.value(right));
                let result = call(*func, a, b);
                let mut reason = self.describe(left, a, right, b);
                let missing = matches!(a, Val::Missing) || matches!(b, Val::Missing);
                let strings = matches!(a, Val::Str(_)) && matches!(b, Val::Str(_));
                if !(result || missing || strings) {
                    reason.push_str(match func {
                        Function::StartsWith => " (STARTS_WITH needs two strings)",
                        Function::EndsWith => " (ENDS_WITH needs two strings)",
                        Function::Contains => " (CONTAINS needs two strings)",
                    });
                }
                (result, reason)
            }
        };
        self.clauses[index].result = result;
        self.clauses[index].reason = reason;
        result
    }

    fn value<'s>(&'s self, operand: &'s Operand) -> Val<'s> {
        match operand {
            Operand::Literal(l) => Val::from_literal(l),
            Operand::Field(Field::Attribute(a)) => {
                self.env.event().attribute(*a).map_or(Val::Missing, Val::Str)
            }
            Operand::Field(Field::Body(path)) => match self.trie.lookup(path) {
                Some(slot) => self.env.slot(slot),
                None => Val::Missing,
            },
        }
    }

    /// What the fields of a clause held: "type is 'x'", "the event has no subject", ...
    fn describe(&self, left: &Operand, a: Val<'_>, right: &Operand, b: Val<'_>) -> String {
        let parts: Vec<String> = [(left, a), (right, b)]
            .into_iter()
            .filter_map(|(operand, value)| match operand {
                Operand::Field(field) => Some(self.describe_field(field, value)),
                Operand::Literal(_) => None,
            })
            .collect();
        if parts.is_empty() {
            "both sides are literals".into()
        } else {
            parts.join(", ")
        }
    }

    fn describe_field(&self, field: &Field, value: Val<'_>) -> String {
        match (field, value) {
            (Field::Attribute(a), Val::Missing) => format!("the event has no {a}"),
            (Field::Body(_), Val::Missing) if json_body(self.env.event()).is_none() => {
                "the event has no JSON body".into()
            }
            (Field::Body(path), Val::Missing) => {
                format!("{field} is not in the body{}", self.missing_step(path))
            }
            (_, value) => format!("{field} is {}", show(value)),
        }
    }

    /// For a missing path, the first step that is missing or not an object.
    fn missing_step(&self, path: &[String]) -> String {
        for len in 1..path.len() {
            let prefix = &path[..len];
            let shown = Field::Body(prefix.to_vec());
            let value = match self.trie.lookup(prefix) {
                Some(slot) => self.env.slot(slot),
                None => continue,
            };
            match value {
                Val::Missing => return format!(" ({shown} is not there)"),
                Val::Object => {}
                other => return format!(" ({shown} is {}, not an object)", show(other)),
            }
        }
        String::new()
    }
}

/// A value for a message: strings quoted as in filters (and cut when long).
fn show(value: Val<'_>) -> String {
    match value {
        Val::Missing => "missing".into(),
        Val::Null => "null".into(),
        Val::Bool(b) => b.to_string(),
        Val::Int(i) => i.to_string(),
        Val::UInt(u) => u.to_string(),
        Val::Float(f) => format!("{f:?}"),
        Val::Str(s) => {
            const MAX: usize = 80;
            let quoted = s.replace('\'', "''");
            if quoted.chars().count() > MAX {
                let head: String = quoted.chars().take(MAX).collect();
                format!("'{head}...' ({} bytes)", s.len())
            } else {
                format!("'{quoted}'")
            }
        }
        Val::Object => "an object".into(),
        Val::Array => "an array".into(),
    }
}

fn kind(value: Val<'_>) -> &'static str {
    match value {
        Val::Missing => "missing",
        Val::Null => "null",
        Val::Bool(_) => "a boolean",
        Val::Int(_) | Val::UInt(_) | Val::Float(_) => "a number",
        Val::Str(_) => "a string",
        Val::Object => "an object",
        Val::Array => "an array",
    }
}

/// Why a comparison of present values was false when the values alone do not say it.
fn compare_failure(op: CompareOp, a: Val<'_>, b: Val<'_>) -> Option<&'static str> {
    let ordering = !matches!(op, CompareOp::Eq | CompareOp::Ne);
    match (a, b) {
        (Val::Missing, _) | (_, Val::Missing) => None,
        (Val::Null, _) | (_, Val::Null) if ordering => Some(" (null has no order)"),
        (Val::Null, _) | (_, Val::Null) => None,
        (Val::Bool(_), Val::Bool(_)) if ordering => Some(" (booleans only compare with = and !=)"),
        (Val::Object | Val::Array, _) | (_, Val::Object | Val::Array) => {
            Some(" (objects and arrays only compare with null)")
        }
        _ if kind(a) != kind(b) => Some(match (kind(a), kind(b)) {
            ("a string", "a number") | ("a number", "a string") => {
                " (a string and a number never compare, even with !=)"
            }
            _ => " (values of different types never compare, even with !=)",
        }),
        _ => None,
    }
}
