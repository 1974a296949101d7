//! Recursive-descent parser: text to [`Expr`].
//!
//! ```text
//! filter     = or_expr END
//! or_expr    = and_expr { OR and_expr }
//! and_expr   = not_expr { AND not_expr }
//! not_expr   = NOT not_expr | primary
//! primary    = "(" or_expr ")" | TRUE | FALSE | call | comparison
//! call       = FUNCTION "(" operand "," operand ")"
//! comparison = operand ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) operand
//! operand    = field | literal
//! ```
//! `TRUE`/`FALSE` followed by a comparison operator start a comparison instead.

use super::ast::{CompareOp, Expr, Field, Function, Literal, Operand, FILTERABLE_ATTRIBUTES};
use super::error::FilterError;
use super::lexer::{Lexer, Token, TokenKind};
use super::{MAX_DEPTH, MAX_FILTER_LEN, MAX_PATH_SEGMENTS};
use crate::event::Attribute;

/// Parses a whole filter.
pub(crate) fn parse(text: &str) -> Result<Expr, FilterError> {
    if text.len() > MAX_FILTER_LEN {
        let mut cut = MAX_FILTER_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        // Keep only the allowed part: an error must not copy a hostile megabyte around.
        return Err(FilterError::new(
            &text[..cut],
            MAX_FILTER_LEN,
            &format!("a filter of at most {MAX_FILTER_LEN} bytes"),
            format!("{} bytes", text.len()),
        ));
    }
    let mut parser = Parser { lexer: Lexer::new(text), depth: 0 };
    if parser.lexer.peek()?.kind == TokenKind::End {
        let offset = parser.lexer.peek()?.offset;
        return Err(parser
            .error_at(offset, "a condition", "the end of the filter".into())
            .with_hint("a filter that matches every event is `true`"));
    }
    let expr = parser.or_expr()?;
    let token = parser.lexer.next()?;
    if token.kind != TokenKind::End {
        let expected = if token.kind == TokenKind::RParen {
            "`AND`, `OR` or the end of the filter (this `)` has no matching `(`)"
        } else {
            "`AND`, `OR` or the end of the filter"
        };
        return Err(parser.unexpected(&token, expected));
    }
    Ok(expr)
}

struct Parser<'t> {
    lexer: Lexer<'t>,
    /// Open parentheses and `NOT`s around the current position.
    depth: usize,
}

/// The keyword a word token spells, if any (keywords are case-insensitive).
fn keyword_of(word: &str) -> Option<&'static str> {
    ["AND", "OR", "NOT", "TRUE", "FALSE", "NULL"].into_iter().find(|k| k.eq_ignore_ascii_case(word))
}

fn compare_op(kind: &TokenKind) -> Option<CompareOp> {
    Some(match kind {
        TokenKind::Eq => CompareOp::Eq,
        TokenKind::Ne => CompareOp::Ne,
        TokenKind::Lt => CompareOp::Lt,
        TokenKind::Le => CompareOp::Le,
        TokenKind::Gt => CompareOp::Gt,
        TokenKind::Ge => CompareOp::Ge,
        _ => return None,
    })
}

/// "type, source, ..., id or $body.<path>", for messages about fields.
fn field_list() -> String {
    let names: Vec<&str> = FILTERABLE_ATTRIBUTES.iter().map(|a| a.name()).collect();
    format!("{} or $body.<path>", names.join(", "))
}

impl<'t> Parser<'t> {
    fn error_at(&self, offset: usize, expected: &str, found: String) -> FilterError {
        FilterError::new(self.lexer.text(), offset, expected, found)
    }

    /// How a token reads in "found ...".
    fn describe(&self, token: &Token) -> String {
        if token.kind == TokenKind::End {
            return "the end of the filter".into();
        }
        let text = self.lexer.slice(token);
        if text.chars().count() > 40 {
            let head: String = text.chars().take(37).collect();
            format!("`{head}...`")
        } else {
            format!("`{text}`")
        }
    }

    fn unexpected(&self, token: &Token, expected: &str) -> FilterError {
        self.error_at(token.offset, expected, self.describe(token))
    }

    fn enter(&mut self, token: &Token) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_at(
                token.offset,
                &format!("at most {MAX_DEPTH} nested parentheses and NOTs"),
                format!("nesting level {}", self.depth),
            ));
        }
        Ok(())
    }

    fn is_keyword(&mut self, kw: &str) -> Result<bool, FilterError> {
        let token = self.lexer.peek()?.clone();
        Ok(token.kind == TokenKind::Word && keyword_of(self.lexer.slice(&token)) == Some(kw))
    }

    /// After `AND`, `OR` or `NOT`: a token that cannot start a condition is reported as the
    /// missing condition after that keyword.
    fn condition_follows(&mut self, keyword: &str) -> Result<(), FilterError> {
        let token = self.lexer.peek()?.clone();
        let cannot_start = match &token.kind {
            TokenKind::End | TokenKind::RParen | TokenKind::Comma => true,
            TokenKind::Word => matches!(keyword_of(self.lexer.slice(&token)), Some("AND" | "OR")),
            kind => compare_op(kind).is_some(),
        };
        if cannot_start {
            return Err(self.unexpected(&token, &format!("a condition after {keyword}")));
        }
        Ok(())
    }

    fn or_expr(&mut self) -> Result<Expr, FilterError> {
        let first = self.and_expr()?;
        if !self.is_keyword("OR")? {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.is_keyword("OR")? {
            self.lexer.next()?;
            self.condition_follows("OR")?;
            items.push(self.and_expr()?);
        }
        Ok(Expr::Or(items))
    }

    fn and_expr(&mut self) -> Result<Expr, FilterError> {
        let first = self.not_expr()?;
        if !self.is_keyword("AND")? {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.is_keyword("AND")? {
            self.lexer.next()?;
            self.condition_follows("AND")?;
            items.push(self.not_expr()?);
        }
        Ok(Expr::And(items))
    }

    fn not_expr(&mut self) -> Result<Expr, FilterError> {
        if self.is_keyword("NOT")? {
            let token = self.lexer.next()?;
            self.enter(&token)?;
            self.condition_follows("NOT")?;
            let inner = self.not_expr()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, FilterError> {
        let token = self.lexer.peek()?.clone();
        match &token.kind {
            TokenKind::LParen => {
                self.lexer.next()?;
                self.enter(&token)?;
                let inner = self.or_expr()?;
                let close = self.lexer.next()?;
                if close.kind != TokenKind::RParen {
                    let err = self.unexpected(&close, "`AND`, `OR` or `)`");
                    return Err(err.with_hint(format!("the `(` at offset {} is not closed", token.offset)));
                }
                self.depth -= 1;
                Ok(inner)
            }
            TokenKind::Word => {
                let word = self.lexer.slice(&token);
                match keyword_of(word) {
                    Some(kw @ ("TRUE" | "FALSE")) => {
                        self.lexer.next()?;
                        // `true = $body.x` is a comparison; a lone `true` a condition.
                        if compare_op(&self.lexer.peek()?.kind).is_some() {
                            let left = Operand::Literal(Literal::Bool(kw == "TRUE"));
                            return self.comparison_rest(left);
                        }
                        Ok(Expr::Const(kw == "TRUE"))
                    }
                    Some("AND" | "OR" | "NOT") => Err(self.unexpected(&token, "a condition")),
                    _ => {
                        let word = word.to_owned();
                        self.lexer.next()?;
                        if self.lexer.peek()?.kind == TokenKind::LParen {
                            return self.call(&token, &word);
                        }
                        let left = self.word_operand(&token, &word)?;
                        self.comparison_rest(left)
                    }
                }
            }
            TokenKind::End => Err(self.unexpected(&token, "a condition")),
            TokenKind::RParen | TokenKind::Comma => Err(self.unexpected(&token, "a condition")),
            _ => {
                let token = self.lexer.next()?;
                let left = self.token_operand(token, "a condition")?;
                self.comparison_rest(left)
            }
        }
    }

    /// After the left operand: the operator and the right operand.
    fn comparison_rest(&mut self, left: Operand) -> Result<Expr, FilterError> {
        let token = self.lexer.next()?;
        let Some(op) = compare_op(&token.kind) else {
            let err = self.unexpected(&token, "a comparison operator (=, !=, <, <=, >, >=)");
            return Err(match left {
                Operand::Field(_) => {
                    err.with_hint("a field alone is not a condition; compare it, e.g. `$body.flag = true`")
                }
                Operand::Literal(_) => err,
            });
        };
        let right = self.operand("a value (a field or a literal)")?;
        Ok(Expr::Compare { op, left, right })
    }

    /// `NAME(a, b)`, the name already consumed and `(` next.
    fn call(&mut self, name_token: &Token, name: &str) -> Result<Expr, FilterError> {
        let Some(func) = Function::from_name(name) else {
            return Err(self.error_at(
                name_token.offset,
                "a function: STARTS_WITH, ENDS_WITH or CONTAINS",
                format!("`{name}`"),
            ));
        };
        self.lexer.next()?; // (
        let expected_arg = format!("an argument of {} (a field or a literal)", func.name());
        let left = self.operand(&expected_arg)?;
        let comma = self.lexer.next()?;
        if comma.kind != TokenKind::Comma {
            let err = self.unexpected(&comma, "`,`");
            return Err(err.with_hint(format!("{} takes 2 arguments", func.name())));
        }
        let right = self.operand(&expected_arg)?;
        let close = self.lexer.next()?;
        if close.kind != TokenKind::RParen {
            let err = self.unexpected(&close, "`)`");
            return Err(err.with_hint(format!("{} takes 2 arguments", func.name())));
        }
        Ok(Expr::Call { func, left, right })
    }

    fn operand(&mut self, expected: &str) -> Result<Operand, FilterError> {
        let token = self.lexer.next()?;
        self.token_operand(token, expected)
    }

    /// Turns a token already taken from the lexer into an operand.
    fn token_operand(&self, token: Token, expected: &str) -> Result<Operand, FilterError> {
        let literal = |l| Ok(Operand::Literal(l));
        match &token.kind {
            TokenKind::String(s) => literal(Literal::String(s.clone())),
            TokenKind::Integer(i) => literal(Literal::Integer(*i)),
            TokenKind::Double(d) => literal(Literal::Double(*d)),
            TokenKind::BodyPath => {
                let text = self.lexer.slice(&token);
                let path: Vec<String> = text.split('.').skip(1).map(str::to_owned).collect();
                if path.len() > MAX_PATH_SEGMENTS {
                    return Err(self.error_at(
                        token.offset,
                        &format!("a $body path of at most {MAX_PATH_SEGMENTS} properties"),
                        format!("{} properties", path.len()),
                    ));
                }
                Ok(Operand::Field(Field::Body(path)))
            }
            TokenKind::DollarWord => Err(self.unknown_field(&token)),
            TokenKind::Word => self.word_operand(&token, self.lexer.slice(&token)),
            _ => Err(self.unexpected(&token, expected)),
        }
    }

    /// A word (already taken) in operand position: `true`, `false`, `null`, or an attribute name.
    fn word_operand(&self, token: &Token, word: &str) -> Result<Operand, FilterError> {
        match keyword_of(word) {
            Some("TRUE") => Ok(Operand::Literal(Literal::Bool(true))),
            Some("FALSE") => Ok(Operand::Literal(Literal::Bool(false))),
            Some("NULL") => Ok(Operand::Literal(Literal::Null)),
            Some(_) => Err(self.unexpected(token, "a value (a field or a literal)")),
            None => match FILTERABLE_ATTRIBUTES.iter().find(|a| a.name() == word) {
                Some(a) => Ok(Operand::Field(Field::Attribute(*a))),
                None => Err(self.unknown_field(token)),
            },
        }
    }

    fn unknown_field(&self, token: &Token) -> FilterError {
        let word = self.lexer.slice(token);
        let err = self.error_at(token.offset, &format!("a field ({})", field_list()), format!("`{word}`"));
        let lower = word.to_ascii_lowercase();
        if let Some(a) = FILTERABLE_ATTRIBUTES.iter().find(|a| a.name() == lower) {
            return err.with_hint(format!(
                "did you mean `{}`? Field names are lower case and case-sensitive",
                a.name()
            ));
        }
        if lower == "$body" || lower.starts_with("$body.") {
            return err
                .with_hint(format!("did you mean `$body{}`? Field names are case-sensitive", &word[5..]));
        }
        if let Some(a) = Attribute::from_name(&lower) {
            return err.with_hint(format!("`{}` cannot be filtered on", a.name()));
        }
        err
    }
}
