//! The parsed form of a route filter, and its canonical text.
//!
//! The tree is public so tools and property tests can build filters without writing text. The
//! parser only produces trees that print back to themselves; a hand-built tree prints to text that
//! re-parses to an equal tree as long as it respects the rules below (each type says which).
//!
//! Canonical text (the [`Display`](std::fmt::Display) of [`Expr`]):
//! - keywords and function names upper case (`AND`, `OR`, `NOT`, `STARTS_WITH`), literals lower
//!   case (`true`, `false`, `null`), one space around operators, `, ` between arguments;
//! - minimal parentheses: an `OR` inside an `AND` is parenthesized, and an `AND` inside an `AND`
//!   (or `OR` inside `OR`) only when the tree nests it (the parser keeps `(a AND b) AND c` as two
//!   nodes, so the text keeps the parentheses);
//! - the operand of `NOT` is parenthesized only when it is an `AND` or an `OR`
//!   (`NOT type = 'x'`, `NOT NOT true`, `NOT (a = 1 OR b = 2)`), so the canonical text never nests
//!   deeper than the text it came from (it stays within [`MAX_DEPTH`](super::MAX_DEPTH)).

use crate::event::Attribute;
use std::fmt;

/// The context attributes a filter may name, in the order error messages list them.
///
/// `id` is a twinroute extension (ADT does not filter on it); `time` and `traceparent` are not
/// filterable, as in ADT.
pub const FILTERABLE_ATTRIBUTES: [Attribute; 7] = [
    Attribute::Type,
    Attribute::Source,
    Attribute::Subject,
    Attribute::DataSchema,
    Attribute::DataContentType,
    Attribute::SpecVersion,
    Attribute::Id,
];

/// A condition: the whole filter, or a part of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `true` (every event) or `false` (none). ADT allows these only as the whole filter;
    /// twinroute allows them wherever a condition may stand.
    Const(bool),
    /// All operands hold. The parser produces at least two operands and never an `And` directly
    /// inside an `And` unless the text had parentheses there. An empty `And` is `true` and prints so.
    And(Vec<Expr>),
    /// Any operand holds. Same shape rules as [`Expr::And`]; an empty `Or` is `false`.
    Or(Vec<Expr>),
    /// The negation of the operand's result (a twinroute extension). Note that
    /// `NOT (subject = 'x')` is true for an event without a subject, while `subject != 'x'` is false.
    Not(Box<Expr>),
    /// `left op right`.
    Compare { op: CompareOp, left: Operand, right: Operand },
    /// `FUNC(left, right)`.
    Call { func: Function, left: Operand, right: Operand },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    /// Every operator, for generators and tests.
    pub const ALL: [CompareOp; 6] =
        [CompareOp::Eq, CompareOp::Ne, CompareOp::Lt, CompareOp::Le, CompareOp::Gt, CompareOp::Ge];

    /// The operator as written in a filter.
    pub const fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }
}

/// A string function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    StartsWith,
    EndsWith,
    Contains,
}

impl Function {
    /// Every function, for generators and tests.
    pub const ALL: [Function; 3] = [Function::StartsWith, Function::EndsWith, Function::Contains];

    /// The canonical (upper-case) name.
    pub const fn name(self) -> &'static str {
        match self {
            Function::StartsWith => "STARTS_WITH",
            Function::EndsWith => "ENDS_WITH",
            Function::Contains => "CONTAINS",
        }
    }

    /// Looks a function up by name, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

/// One side of a comparison or one argument of a function.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Field(Field),
    Literal(Literal),
}

/// A value read from the event.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// A context attribute; prints by name. Only [`FILTERABLE_ATTRIBUTES`] re-parse.
    Attribute(Attribute),
    /// `$body` followed by the path segments (empty: the whole body). To re-parse, each segment
    /// must match `[A-Za-z_$][A-Za-z0-9_$]*` and there may be at most
    /// [`MAX_PATH_SEGMENTS`](super::MAX_PATH_SEGMENTS) of them.
    Body(Vec<String>),
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// Single-quoted; a quote inside is written twice (`'it''s'`).
    String(String),
    /// A whole number without `.` or exponent, in the range of `i64`.
    Integer(i64),
    /// A number with `.` and/or an exponent. Must be finite to re-parse.
    Double(f64),
    Bool(bool),
    Null,
}

impl Expr {
    /// True when any operand anywhere in the tree reads `$body`.
    pub fn reads_body(&self) -> bool {
        match self {
            Expr::Const(_) => false,
            Expr::And(items) | Expr::Or(items) => items.iter().any(Expr::reads_body),
            Expr::Not(inner) => inner.reads_body(),
            Expr::Compare { left, right, .. } | Expr::Call { left, right, .. } => {
                left.reads_body() || right.reads_body()
            }
        }
    }

    /// Calls `f` on every operand of the tree (comparison sides and function arguments).
    pub(crate) fn for_each_operand<'a>(&'a self, f: &mut impl FnMut(&'a Operand)) {
        match self {
            Expr::Const(_) => {}
            Expr::And(items) | Expr::Or(items) => {
                for item in items {
                    item.for_each_operand(f);
                }
            }
            Expr::Not(inner) => inner.for_each_operand(f),
            Expr::Compare { left, right, .. } | Expr::Call { left, right, .. } => {
                f(left);
                f(right);
            }
        }
    }

    /// Binding strength, for minimal parentheses: OR < AND < NOT < everything else.
    fn precedence(&self) -> u8 {
        match self {
            Expr::Or(items) if !items.is_empty() => 1,
            Expr::And(items) if !items.is_empty() => 2,
            Expr::Not(_) => 3,
            _ => 4,
        }
    }

    fn fmt_child(&self, f: &mut fmt::Formatter<'_>, parenthesize: bool) -> fmt::Result {
        if parenthesize {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

impl Operand {
    /// True for `$body` fields.
    pub fn reads_body(&self) -> bool {
        matches!(self, Operand::Field(Field::Body(_)))
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(b) => write!(f, "{b}"),
            Expr::And(items) if items.is_empty() => f.write_str("true"),
            Expr::Or(items) if items.is_empty() => f.write_str("false"),
            Expr::And(items) | Expr::Or(items) => {
                let (keyword, own) = match self {
                    Expr::And(_) => (" AND ", 2),
                    _ => (" OR ", 1),
                };
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(keyword)?;
                    }
                    // Same-kind children are parenthesized too: the parser would flatten them.
                    item.fmt_child(f, item.precedence() <= own)?;
                }
                Ok(())
            }
            Expr::Not(inner) => {
                f.write_str("NOT ")?;
                // Comparisons bind tighter than NOT: `NOT type = 'x'` is `NOT (type = 'x')`.
                inner.fmt_child(f, inner.precedence() < 3)
            }
            Expr::Compare { op, left, right } => write!(f, "{left} {} {right}", op.symbol()),
            Expr::Call { func, left, right } => write!(f, "{}({left}, {right})", func.name()),
        }
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Field(field) => write!(f, "{field}"),
            Operand::Literal(literal) => write!(f, "{literal}"),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Attribute(a) => f.write_str(a.name()),
            Field::Body(path) => {
                f.write_str("$body")?;
                for segment in path {
                    write!(f, ".{segment}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::String(s) => {
                f.write_str("'")?;
                for (i, part) in s.split('\'').enumerate() {
                    if i > 0 {
                        f.write_str("''")?;
                    }
                    f.write_str(part)?;
                }
                f.write_str("'")
            }
            Literal::Integer(i) => write!(f, "{i}"),
            // `{:?}` is the shortest text that reads back to the same f64, and always has a `.`
            // or an exponent, so it re-parses as a double (`5.0`, `1e300`, `1.5e-7`).
            Literal::Double(d) => write!(f, "{d:?}"),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Null => f.write_str("null"),
        }
    }
}
