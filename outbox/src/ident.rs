//! SQL identifiers that are safe to splice into statements.
//!
//! Identifiers cannot be bound as parameters, so any configurable schema or table name is a
//! potential injection. Only plain lowercase identifiers are accepted, and they are quoted anyway.

use std::fmt;

use crate::{Error, Result};

/// A validated SQL identifier: `^[a-z_][a-z0-9_]*$`, at most 63 bytes (Postgres' `NAMEDATALEN - 1`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Ident(String);

impl Ident {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`] naming the rule that `name` breaks.
    pub fn new(name: &str) -> Result<Self> {
        let fail = |reason| {
            Err(Error::InvalidIdentifier {
                ident: name.to_owned(),
                reason,
            })
        };
        if name.is_empty() {
            return fail("must not be empty");
        }
        if name.len() > 63 {
            return fail("longer than 63 bytes (Postgres would silently truncate it)");
        }
        let mut chars = name.chars();
        let first = chars.next().unwrap_or('0');
        if !(first.is_ascii_lowercase() || first == '_') {
            return fail("must start with a lowercase letter or '_'");
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return fail("only lowercase letters, digits and '_' are allowed");
        }
        Ok(Self(name.to_owned()))
    }

    /// The identifier, unquoted.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier double-quoted for SQL.
    #[must_use]
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the outbox tables live: an optional schema (default: the connection's `search_path`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRef {
    schema: Option<Ident>,
}

impl TableRef {
    /// Tables in `schema`.
    ///
    /// # Errors
    /// [`Error::InvalidIdentifier`] when `schema` is not a plain lowercase identifier.
    pub fn in_schema(schema: &str) -> Result<Self> {
        Ok(Self {
            schema: Some(Ident::new(schema)?),
        })
    }

    /// The schema, if one was set.
    #[must_use]
    pub fn schema(&self) -> Option<&Ident> {
        self.schema.as_ref()
    }

    /// `table` qualified with the schema and quoted, ready for SQL.
    #[must_use]
    pub fn qualify(&self, table: crate::contract::Table) -> String {
        self.qualify_name(table.name())
    }

    /// `function` qualified with the schema and quoted, ready for SQL.
    #[must_use]
    pub fn qualify_function(&self, function: crate::contract::Function) -> String {
        self.qualify_name(function.name())
    }

    fn qualify_name(&self, name: &str) -> String {
        match &self.schema {
            Some(s) => format!("{}.\"{name}\"", s.quoted()),
            None => format!("\"{name}\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for ok in ["outbox", "_x", "a1_b2", &"a".repeat(63)] {
            assert_eq!(Ident::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        for bad in [
            "",
            "1abc",
            "Outbox",
            "out-box",
            "a b",
            "x\";drop table outbox;--",
            "é",
            &"a".repeat(64),
        ] {
            let err = Ident::new(bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidIdentifier { ident, .. } if ident == bad),
                "{bad:?} -> {err}"
            );
        }
    }
}
