//! Calico's selector language: a parser into an AST, a printer back to text, and evaluation
//! against a label map with Calico's semantics.
//!
//! Grammar (lowest precedence first): `a || b`, `a && b`, `!a`, then the atoms `( … )`,
//! `all()`, `global()`, `has(k)`, `k == 'v'`, `k != 'v'`, `k in {'a', 'b'}`,
//! `k not in {…}`, `k contains 's'`, `k starts with 's'`, `k ends with 's'`. Strings take
//! single or double quotes (no escapes). An empty selector means `all()`.
//!
//! ```
//! use cnimig_core::policy::selector::Selector;
//! let s: Selector = "app == 'web' && (tier in {'fe', 'be'} || !has(legacy))".parse().unwrap();
//! assert_eq!(s.to_string(), "app == 'web' && (tier in {'fe', 'be'} || !has(legacy))");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A parsed Calico selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// `all()`: every endpoint (or every namespace, in a namespace selector).
    All,
    /// `global()`: in a `namespaceSelector`, the non-namespaced endpoints (host endpoints and
    /// global network sets). Matches no pod.
    Global,
    /// `k == 'v'`.
    Eq(String, String),
    /// `k != 'v'` (also true when the label is absent).
    Ne(String, String),
    /// `k in {…}`.
    In(String, Vec<String>),
    /// `k not in {…}` (also true when the label is absent).
    NotIn(String, Vec<String>),
    /// `has(k)`.
    Has(String),
    /// `k starts with 's'`. Not expressible as a Kubernetes label selector.
    StartsWith(String, String),
    /// `k ends with 's'`. Not expressible as a Kubernetes label selector.
    EndsWith(String, String),
    /// `k contains 's'`. Not expressible as a Kubernetes label selector.
    Contains(String, String),
    /// `!e`.
    Not(Box<Selector>),
    /// `a && b && …` (two or more).
    And(Vec<Selector>),
    /// `a || b || …` (two or more).
    Or(Vec<Selector>),
}

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid Calico selector {input:?}: at position {position}: expected {expected}, found {found}"
)]
pub struct SelectorError {
    /// The whole selector text.
    pub input: String,
    /// Character offset (0-based) where parsing failed.
    pub position: usize,
    /// What the parser expected there.
    pub expected: String,
    /// What it found instead.
    pub found: String,
}

impl Selector {
    /// Parses a selector; an empty or blank string is `all()`.
    ///
    /// # Errors
    /// [`SelectorError`] naming the position and what was expected.
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        let tokens = lex(input)?;
        let mut p = Parser {
            input,
            tokens,
            pos: 0,
            depth: 0,
        };
        if p.peek().tok == Tok::End {
            return Ok(Selector::All);
        }
        let sel = p.or_expr()?;
        if p.peek().tok != Tok::End {
            return Err(p.error("'&&', '||', ')' or the end of the selector"));
        }
        Ok(sel)
    }

    /// Whether the selector matches a label map, with Calico's semantics (`!=` and `not in`
    /// are true for an absent label; `global()` matches nothing here).
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_with_global(labels, false)
    }

    /// Like [`Selector::matches`], with `global()` taking the value `global`: true when a
    /// `namespaceSelector` is evaluated for a non-namespaced object (a `GlobalNetworkSet`),
    /// which has no namespace labels (so `labels` is then empty).
    #[must_use]
    pub fn matches_with_global(&self, labels: &BTreeMap<String, String>, global: bool) -> bool {
        let m = |e: &Selector| e.matches_with_global(labels, global);
        match self {
            Selector::All => true,
            Selector::Global => global,
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::Has(k) => labels.contains_key(k),
            Selector::StartsWith(k, s) => labels.get(k).is_some_and(|l| l.starts_with(s.as_str())),
            Selector::EndsWith(k, s) => labels.get(k).is_some_and(|l| l.ends_with(s.as_str())),
            Selector::Contains(k, s) => labels.get(k).is_some_and(|l| l.contains(s.as_str())),
            Selector::Not(e) => !m(e),
            Selector::And(es) => es.iter().all(m),
            Selector::Or(es) => es.iter().any(m),
        }
    }

    /// True when some label key the selector tests satisfies `f`.
    #[must_use]
    pub fn tests_key(&self, f: &dyn Fn(&str) -> bool) -> bool {
        self.any(&|s| match s {
            Selector::Eq(k, _)
            | Selector::Ne(k, _)
            | Selector::In(k, _)
            | Selector::NotIn(k, _)
            | Selector::Has(k)
            | Selector::StartsWith(k, _)
            | Selector::EndsWith(k, _)
            | Selector::Contains(k, _) => f(k),
            _ => false,
        })
    }

    /// True when the selector (anywhere inside) uses `starts with`, `ends with` or `contains`,
    /// which Kubernetes and Cilium label selectors cannot express.
    #[must_use]
    pub fn uses_string_match(&self) -> bool {
        self.any(&|s| {
            matches!(
                s,
                Selector::StartsWith(..) | Selector::EndsWith(..) | Selector::Contains(..)
            )
        })
    }

    /// True when the selector uses `global()` anywhere.
    #[must_use]
    pub fn uses_global(&self) -> bool {
        self.any(&|s| matches!(s, Selector::Global))
    }

    fn any(&self, f: &dyn Fn(&Selector) -> bool) -> bool {
        if f(self) {
            return true;
        }
        match self {
            Selector::Not(e) => e.any(f),
            Selector::And(es) | Selector::Or(es) => es.iter().any(|e| e.any(f)),
            _ => false,
        }
    }

    fn precedence(&self) -> u8 {
        match self {
            Selector::Or(_) => 1,
            Selector::And(_) => 2,
            _ => 3,
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// Quotes a string literal, with single quotes unless the text holds one.
fn quote(s: &str) -> String {
    if s.contains('\'') {
        format!("\"{s}\"")
    } else {
        format!("'{s}'")
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &[String]| vs.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ");
        match self {
            Selector::All => f.write_str("all()"),
            Selector::Global => f.write_str("global()"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", quote(v)),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", set(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", set(vs)),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::StartsWith(k, s) => write!(f, "{k} starts with {}", quote(s)),
            Selector::EndsWith(k, s) => write!(f, "{k} ends with {}", quote(s)),
            Selector::Contains(k, s) => write!(f, "{k} contains {}", quote(s)),
            Selector::Not(e) => match &**e {
                Selector::Has(k) => write!(f, "!has({k})"),
                Selector::All | Selector::Global => write!(f, "!{e}"),
                _ => write!(f, "!({e})"),
            },
            Selector::And(es) | Selector::Or(es) => {
                let (op, prec) = if matches!(self, Selector::And(_)) {
                    (" && ", 2)
                } else {
                    (" || ", 1)
                };
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    if e.precedence() <= prec {
                        write!(f, "({e})")?;
                    } else {
                        write!(f, "{e}")?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
    LBrace,
    RBrace,
    Comma,
    EqEq,
    NotEq,
    Bang,
    AndAnd,
    OrOr,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("{w:?}"),
            Tok::Str(s) => format!("the string {}", quote(s)),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::LBrace => "'{'".into(),
            Tok::RBrace => "'}'".into(),
            Tok::Comma => "','".into(),
            Tok::EqEq => "'=='".into(),
            Tok::NotEq => "'!='".into(),
            Tok::Bang => "'!'".into(),
            Tok::AndAnd => "'&&'".into(),
            Tok::OrOr => "'||'".into(),
            Tok::End => "the end of the selector".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    pos: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

fn lex(input: &str) -> Result<Vec<Token>, SelectorError> {
    let chars: Vec<char> = input.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |pos: usize, expected: &str, found: String| SelectorError {
        input: input.to_string(),
        position: pos,
        expected: expected.to_string(),
        found,
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let two = |a: char, b: char| c == a && chars.get(i + 1) == Some(&b);
        let tok = if two('=', '=') {
            i += 2;
            Tok::EqEq
        } else if two('!', '=') {
            i += 2;
            Tok::NotEq
        } else if two('&', '&') {
            i += 2;
            Tok::AndAnd
        } else if two('|', '|') {
            i += 2;
            Tok::OrOr
        } else if c == '!' {
            i += 1;
            Tok::Bang
        } else if c == '(' {
            i += 1;
            Tok::LParen
        } else if c == ')' {
            i += 1;
            Tok::RParen
        } else if c == '{' {
            i += 1;
            Tok::LBrace
        } else if c == '}' {
            i += 1;
            Tok::RBrace
        } else if c == ',' {
            i += 1;
            Tok::Comma
        } else if c == '\'' || c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += 1;
            }
            if j >= chars.len() {
                return Err(err(
                    chars.len(),
                    &format!("a closing {c} for the string started at position {start}"),
                    "the end of the selector".into(),
                ));
            }
            let s: String = chars[i + 1..j].iter().collect();
            i = j + 1;
            Tok::Str(s)
        } else if is_word_char(c) {
            let mut j = i;
            while j < chars.len() && is_word_char(chars[j]) {
                j += 1;
            }
            let w: String = chars[i..j].iter().collect();
            i = j;
            Tok::Word(w)
        } else {
            return Err(err(
                i,
                "a label key, a string, an operator or a parenthesis",
                format!("{c:?}"),
            ));
        };
        out.push(Token { tok, pos: start });
    }
    out.push(Token {
        tok: Tok::End,
        pos: chars.len(),
    });
    Ok(out)
}

struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

/// Deeper nesting than this is refused (keeps recursion bounded on hostile input).
const MAX_DEPTH: usize = 64;

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // `lex` always ends the list with `End`; stay on it.
        let i = self.pos.min(self.tokens.len().saturating_sub(1));
        &self.tokens[i]
    }
    fn peek2(&self) -> &Tok {
        let i = (self.pos + 1).min(self.tokens.len().saturating_sub(1));
        &self.tokens[i].tok
    }
    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.tokens.len() {
            self.pos += 1;
        }
        t
    }
    fn error(&self, expected: &str) -> SelectorError {
        let t = self.peek();
        SelectorError {
            input: self.input.to_string(),
            position: t.pos,
            expected: expected.to_string(),
            found: t.tok.describe(),
        }
    }
    fn expect(&mut self, tok: &Tok, expected: &str) -> Result<(), SelectorError> {
        if &self.peek().tok == tok {
            self.bump();
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn or_expr(&mut self) -> Result<Selector, SelectorError> {
        let mut items = vec![self.and_expr()?];
        while self.peek().tok == Tok::OrOr {
            self.bump();
            items.push(self.and_expr()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Selector::Or(items)
        })
    }

    fn and_expr(&mut self) -> Result<Selector, SelectorError> {
        let mut items = vec![self.unary()?];
        while self.peek().tok == Tok::AndAnd {
            self.bump();
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Selector::And(items)
        })
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        if self.peek().tok == Tok::Bang {
            self.bump();
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(self.error("less deeply nested expressions"));
            }
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Selector::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        match self.peek().tok.clone() {
            Tok::Str(s) => {
                self.bump();
                Ok(s)
            }
            _ => Err(self.error("a string literal in quotes")),
        }
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect(&Tok::LBrace, "'{' to open a set of strings")?;
        let mut vs = Vec::new();
        if self.peek().tok == Tok::RBrace {
            self.bump();
            return Ok(vs);
        }
        loop {
            vs.push(self.string()?);
            match self.peek().tok {
                Tok::Comma => {
                    self.bump();
                }
                Tok::RBrace => {
                    self.bump();
                    return Ok(vs);
                }
                _ => return Err(self.error("',' or '}'")),
            }
        }
    }

    fn primary(&mut self) -> Result<Selector, SelectorError> {
        let t = self.peek().clone();
        match t.tok {
            Tok::LParen => {
                self.bump();
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(self.error("less deeply nested parentheses"));
                }
                let e = self.or_expr()?;
                self.depth -= 1;
                self.expect(&Tok::RParen, "')'")?;
                Ok(e)
            }
            Tok::Word(w) if self.peek2() == &Tok::LParen => {
                let word = w.as_str();
                match word {
                    "all" | "global" => {
                        self.bump();
                        self.bump();
                        self.expect(&Tok::RParen, &format!("')' after {word}("))?;
                        Ok(if word == "all" {
                            Selector::All
                        } else {
                            Selector::Global
                        })
                    }
                    "has" => {
                        self.bump();
                        self.bump();
                        let key = match self.peek().tok.clone() {
                            Tok::Word(k) => {
                                self.bump();
                                k
                            }
                            _ => return Err(self.error("a label key inside has(…)")),
                        };
                        self.expect(&Tok::RParen, "')' to close has(")?;
                        Ok(Selector::Has(key))
                    }
                    _ => Err(self.error("all(), global(), has(key) or a label key")),
                }
            }
            Tok::Word(key) => {
                self.bump();
                let op = self.peek().clone();
                match op.tok {
                    Tok::EqEq => {
                        self.bump();
                        Ok(Selector::Eq(key, self.string()?))
                    }
                    Tok::NotEq => {
                        self.bump();
                        Ok(Selector::Ne(key, self.string()?))
                    }
                    Tok::Word(ref w) if w == "in" => {
                        self.bump();
                        Ok(Selector::In(key, self.set()?))
                    }
                    Tok::Word(ref w) if w == "not" => {
                        self.bump();
                        match self.peek().tok {
                            Tok::Word(ref w2) if w2 == "in" => {
                                self.bump();
                                Ok(Selector::NotIn(key, self.set()?))
                            }
                            _ => Err(self.error("'in' after 'not'")),
                        }
                    }
                    Tok::Word(ref w) if w == "contains" => {
                        self.bump();
                        Ok(Selector::Contains(key, self.string()?))
                    }
                    Tok::Word(ref w) if w == "starts" || w == "ends" => {
                        let starts = w == "starts";
                        self.bump();
                        match self.peek().tok {
                            Tok::Word(ref w2) if w2 == "with" => {
                                self.bump();
                            }
                            _ => return Err(self.error("'with'")),
                        }
                        let s = self.string()?;
                        Ok(if starts {
                            Selector::StartsWith(key, s)
                        } else {
                            Selector::EndsWith(key, s)
                        })
                    }
                    _ => Err(self.error(&format!(
                        "an operator after the label key {key:?} ('==', '!=', 'in', 'not in', 'contains', 'starts with', 'ends with')"
                    ))),
                }
            }
            _ => Err(self.error(
                "a label key, all(), global(), has(key), '!' or '(' to start an expression",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn parses_every_operator_and_round_trips() {
        for text in [
            "all()",
            "global()",
            "app == 'web'",
            "app != \"it's\"",
            "app in {'a', 'b'}",
            "app not in {}",
            "has(projectcalico.org/name)",
            "!has(app)",
            "app starts with 'we'",
            "app ends with 'eb'",
            "app contains 'e'",
            "a == 'x' && b == 'y' && c == 'z'",
            "a == 'x' || b == 'y'",
            "(a == 'x' || b == 'y') && c == 'z'",
            "!(a == 'x' && b == 'y')",
            "!(a == 'x')",
        ] {
            let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let printed = s.to_string();
            assert_eq!(Selector::parse(&printed).unwrap(), s, "{text} -> {printed}");
        }
    }

    #[test]
    fn precedence_and_binds_tighter_than_or() {
        let s = Selector::parse("a == '1' || b == '2' && c == '3'").unwrap();
        assert_eq!(
            s,
            Selector::Or(vec![
                Selector::Eq("a".into(), "1".into()),
                Selector::And(vec![
                    Selector::Eq("b".into(), "2".into()),
                    Selector::Eq("c".into(), "3".into())
                ])
            ])
        );
        assert_eq!(Selector::parse("  ").unwrap(), Selector::All);
    }

    #[test]
    fn calico_semantics_for_absent_labels() {
        let l = labels(&[("app", "web")]);
        assert!(Selector::parse("tier != 'fe'").unwrap().matches(&l));
        assert!(Selector::parse("tier not in {'fe'}").unwrap().matches(&l));
        assert!(!Selector::parse("tier in {'fe'}").unwrap().matches(&l));
        assert!(Selector::parse("app starts with 'w'").unwrap().matches(&l));
        assert!(!Selector::parse("global()").unwrap().matches(&l));
        assert!(
            Selector::parse("!has(tier) && app == 'web'")
                .unwrap()
                .matches(&l)
        );
    }

    #[test]
    fn errors_name_position_and_expectation() {
        let e = Selector::parse("app == web").unwrap_err();
        assert_eq!(e.position, 7);
        assert!(e.expected.contains("string"), "{e}");
        let e = Selector::parse("app in {'a' 'b'}").unwrap_err();
        assert_eq!(e.position, 12);
        let e = Selector::parse("has(app").unwrap_err();
        assert!(e.expected.contains(')'), "{e}");
        let e = Selector::parse("app == 'x").unwrap_err();
        assert!(e.expected.contains("closing"), "{e}");
        let e = Selector::parse("a == 'x' b").unwrap_err();
        assert_eq!(e.position, 9);
        let deep = "!".repeat(200) + "all()";
        assert!(Selector::parse(&deep).is_err());
        assert!(Selector::parse("app ~ 'x'").is_err());
    }
}
