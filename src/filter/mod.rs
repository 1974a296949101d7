//! ADT route filters: parsing, compiling and evaluating the filter language of spec §3.
//!
//! A [`Filter`] is parsed and compiled once, when a route is created, and then evaluated on every
//! event: [`Filter::matches`] (and [`RouteTable::route`](crate::routing::RouteTable::route)) is
//! the daemon's hot path and does not allocate. `$body` fields are read straight from the event's
//! JSON bytes (see `body.rs`), not through a parsed `serde_json::Value`, unless the event's body
//! was parsed already. The full language reference, with every semantic choice twinroute made
//! where ADT does not document one, is `docs/filter-language.md`.
//!
//! Layout: `lexer` and `parser` turn text into an [`ast::Expr`] (whose `Display` is the canonical
//! text); `eval` folds and compiles the tree and evaluates it; `body` extracts `$body` values;
//! `explain` evaluates clause by clause for `twinroute route explain`.

pub mod ast;
mod body;
mod error;
mod eval;
mod explain;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

pub use error::FilterError;
pub use explain::{Clause, Explanation};

pub(crate) use eval::{Compiled, Compiler, Env, Shared};

use crate::event::CloudEvent;
use std::fmt;
use std::sync::Arc;

/// Longest filter text accepted, in bytes. ADT does not document a limit; 4 KiB is far above
/// any real filter (the longest ADT doc example is 101 bytes) and bounds the work a hostile
/// route definition can cause.
pub const MAX_FILTER_LEN: usize = 4096;

/// Deepest nesting of parentheses and `NOT`s. Keeps every walk over a tree shallow (no stack
/// overflow on hostile input); real filters nest two or three levels.
pub const MAX_DEPTH: usize = 64;

/// Most property names in one `$body` path (`$body.a.b.c` has 3).
pub const MAX_PATH_SEGMENTS: usize = 32;

/// A compiled route filter. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct Filter {
    inner: Arc<Inner>,
}

struct Inner {
    /// The text as given (for `GET /eventroutes`, which returns what was `PUT`).
    text: Box<str>,
    expr: ast::Expr,
    program: eval::Program,
}

impl Filter {
    /// Parses and compiles a filter.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let expr = parser::parse(text)?;
        Ok(Filter::build(text.into(), expr))
    }

    /// Compiles a tree built by hand; `text()` is then the tree's canonical text.
    pub fn from_expr(expr: ast::Expr) -> Filter {
        Filter::build(expr.to_string().into(), expr)
    }

    fn build(text: Box<str>, expr: ast::Expr) -> Filter {
        let program = eval::Program::compile(&expr);
        Filter { inner: Arc::new(Inner { text, expr, program }) }
    }

    /// Whether the event passes the filter.
    #[inline]
    pub fn matches(&self, event: &CloudEvent) -> bool {
        self.inner.program.matches(event)
    }

    /// The filter text as given to [`Filter::parse`].
    pub fn text(&self) -> &str {
        &self.inner.text
    }

    /// The parsed tree, as written (before any simplification).
    pub fn expr(&self) -> &ast::Expr {
        &self.inner.expr
    }

    /// Whether any operand reads `$body`.
    pub fn reads_body(&self) -> bool {
        self.inner.expr.reads_body()
    }

    /// `Some(b)` when the filter gives `b` for every event: `true` and `false`, and anything that
    /// simplifies to them (`'a' = 'a'`, `type = 5`, `false AND ...`). A `Some(false)` route is
    /// disabled.
    pub fn constant(&self) -> Option<bool> {
        self.inner.program.constant()
    }

    /// Evaluates clause by clause and says why the filter did or did not match.
    pub fn explain(&self, event: &CloudEvent) -> Explanation {
        explain::explain(&self.inner.expr, event)
    }
}

impl fmt::Display for Filter {
    /// The canonical text of the tree (upper-case keywords, minimal parentheses); it parses back
    /// to an equal tree.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner.expr)
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Filter").field(&self.inner.text).finish()
    }
}

/// Two filters are equal when their trees are (whatever the spacing or keyword case).
impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.expr == other.inner.expr
    }
}

impl std::str::FromStr for Filter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Filter::parse(s)
    }
}

/// Serialized as the text as given.
impl serde::Serialize for Filter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.text())
    }
}

/// Deserialized from filter text; a parse error becomes the deserializer's error message.
impl<'de> serde::Deserialize<'de> for Filter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Filter::parse(&text).map_err(serde::de::Error::custom)
    }
}
