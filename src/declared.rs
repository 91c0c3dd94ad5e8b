//! What the configuration declares to policies: the Cedar type of each claim an issuer's
//! tokens may carry into `context.token.claims` (`[issuer.claims]`), and the time zone of
//! `context.time` (`[policy] time_zone`). Both are parsed while the configuration is read,
//! so that a bad value is reported at its line; both know their Cedar schema form.

use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The Cedar type of a declared claim: `String`, `Long`, `Bool`, or a `Set<...>` of one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimType {
    /// A JSON string.
    String,
    /// A JSON integer that fits in 64 bits (Cedar's `Long`); `5.0` is not one.
    Long,
    /// `true` or `false`.
    Bool,
    /// A JSON array whose every item has the inner type (a string alone is not a set).
    Set(Box<ClaimType>),
}

/// The type names a declaration may use, for messages.
pub const CLAIM_TYPES: &str =
    "\"String\", \"Long\", \"Bool\", \"Set<String>\", \"Set<Long>\", \"Set<Bool>\"";

impl ClaimType {
    /// Parses a type name such as `Set<String>`.
    pub fn parse(text: &str) -> Result<ClaimType, String> {
        let t = text.trim();
        let inner = t
            .strip_prefix("Set<")
            .and_then(|rest| rest.strip_suffix('>'));
        match (t, inner) {
            ("String", _) => Ok(ClaimType::String),
            ("Long", _) => Ok(ClaimType::Long),
            ("Bool", _) => Ok(ClaimType::Bool),
            (_, Some(inner)) => Ok(ClaimType::Set(Box::new(ClaimType::parse(inner)?))),
            _ => Err(format!(
                "\"{text}\" is not a claim type: use one of {CLAIM_TYPES} (records are not supported; declare the claims you read)"
            )),
        }
    }

    /// Whether a claim's JSON value has this type, exactly as the claim reaches Cedar.
    /// SECURITY: no coercion: `"5"` is not a `Long`, `1` is not a `Bool`, `"a"` is not a
    /// `Set<String>`.
    pub fn admits(&self, v: &Value) -> bool {
        match (self, v) {
            (ClaimType::String, Value::String(_)) => true,
            (ClaimType::Long, Value::Number(n)) => n.as_i64().is_some(),
            (ClaimType::Bool, Value::Bool(_)) => true,
            (ClaimType::Set(inner), Value::Array(items)) => items.iter().all(|i| inner.admits(i)),
            _ => false,
        }
    }
}

/// Problems with claims that two issuers declare with different types: policies see one
/// `context.token.claims` type, whichever issuer signed the token.
pub fn conflicting_claim_types<'a>(
    issuers: impl Iterator<Item = (&'a str, &'a [(String, ClaimType)])>,
) -> Vec<String> {
    let mut declared = std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    for (issuer, claims) in issuers {
        for (name, ty) in claims {
            match declared.insert(name, (ty, issuer)) {
                Some((other, by)) if other != ty => problems.push(format!(
                    "issuer \"{issuer}\": claims.{name}: declared {ty} here and {other} by issuer \"{by}\"; policies see one type for context.token.claims.{name}"
                )),
                _ => {}
            }
        }
    }
    problems
}

/// The names of the claims each issuer declares (`[issuer.claims]`). With a schema, these
/// are the only claims policies see in `context.token.claims`: the schema's claims record
/// is closed, so the validator types `has` of any other claim as false and refuses reading
/// it, and the context must agree with it (docs/SCHEMA-AND-TIME.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredClaims(BTreeMap<String, BTreeSet<String>>);

impl DeclaredClaims {
    /// The claim names of each issuer's declarations.
    pub fn of<'a>(
        issuers: impl Iterator<Item = (&'a str, &'a [(String, ClaimType)])>,
    ) -> DeclaredClaims {
        DeclaredClaims(
            issuers
                .map(|(issuer, claims)| {
                    (
                        issuer.to_string(),
                        claims.iter().map(|(name, _)| name.clone()).collect(),
                    )
                })
                .collect(),
        )
    }

    /// Whether `issuer` declares `claim`.
    pub fn declares(&self, issuer: &str, claim: &str) -> bool {
        self.0
            .get(issuer)
            .is_some_and(|names| names.contains(claim))
    }
}

/// What a JSON value is, for a message that names a claim's actual type.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.as_i64().is_some() => "an integer",
        Value::Number(n) if n.is_u64() => "an integer too large for a Long",
        Value::Number(_) => "a non-integer number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array (of another item type)",
        Value::Object(_) => "an object",
    }
}

impl fmt::Display for ClaimType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimType::String => f.write_str("String"),
            ClaimType::Long => f.write_str("Long"),
            ClaimType::Bool => f.write_str("Bool"),
            ClaimType::Set(inner) => write!(f, "Set<{inner}>"),
        }
    }
}

impl<'de> Deserialize<'de> for ClaimType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ClaimType::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The time zone of `context.time`'s local fields: an IANA name (`Europe/Paris`), from the
/// tz database compiled into the binary, so that it needs no `/usr/share/zoneinfo`.
#[derive(Debug, Clone)]
pub struct TimeZoneSetting {
    name: String,
    zone: jiff::tz::TimeZone,
}

impl TimeZoneSetting {
    /// UTC, the default.
    pub fn utc() -> TimeZoneSetting {
        TimeZoneSetting {
            name: "UTC".into(),
            zone: jiff::tz::TimeZone::UTC,
        }
    }

    /// The zone of an IANA name.
    pub fn parse(name: &str) -> Result<TimeZoneSetting, String> {
        if name == "UTC" {
            return Ok(TimeZoneSetting::utc());
        }
        jiff::tz::db()
            .get(name)
            .map(|zone| TimeZoneSetting {
                name: name.to_string(),
                zone,
            })
            .map_err(|_| {
                format!(
                    "\"{name}\" is not a time zone of the tz database: use an IANA name such as \"Europe/Paris\" or \"UTC\""
                )
            })
    }

    /// The IANA name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The zone.
    pub fn zone(&self) -> &jiff::tz::TimeZone {
        &self.zone
    }
}

impl Default for TimeZoneSetting {
    fn default() -> Self {
        TimeZoneSetting::utc()
    }
}

impl<'de> Deserialize<'de> for TimeZoneSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TimeZoneSetting::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_types_parse_and_print() {
        for t in [
            "String",
            "Long",
            "Bool",
            "Set<String>",
            "Set<Long>",
            "Set<Set<Bool>>",
        ] {
            assert_eq!(
                ClaimType::parse(t).map(|t| t.to_string()),
                Ok(t.to_string())
            );
        }
        for bad in [
            "string",
            "Int",
            "Record",
            "Set<>",
            "Set<Strin>",
            "Set<String",
            "",
            "{}",
        ] {
            let e = ClaimType::parse(bad).expect_err(bad);
            assert!(e.contains("is not a claim type"), "{e}");
        }
    }

    /// SECURITY: a value of another type is never taken for the declared one.
    #[test]
    fn a_claim_has_its_declared_type_only() {
        let cases = [
            ("String", json!("x"), true),
            ("String", json!(5), false),
            ("String", json!(["x"]), false),
            ("Long", json!(5), true),
            ("Long", json!(-5), true),
            ("Long", json!("5"), false),
            ("Long", json!(5.0), false),
            ("Long", json!(u64::MAX), false),
            ("Long", json!(true), false),
            ("Bool", json!(true), true),
            ("Bool", json!(1), false),
            ("Bool", json!("true"), false),
            ("Set<String>", json!(["a", "b"]), true),
            ("Set<String>", json!([]), true),
            ("Set<String>", json!("a"), false),
            ("Set<String>", json!(["a", 1]), false),
            ("Set<Long>", json!([1, 2]), true),
            ("String", json!({"a": 1}), false),
            ("String", json!(null), false),
        ];
        for (t, v, ok) in cases {
            assert_eq!(ClaimType::parse(t).unwrap().admits(&v), ok, "{t} {v}");
        }
    }

    #[test]
    fn time_zones_come_from_the_bundled_database() {
        assert_eq!(
            TimeZoneSetting::parse("Europe/Paris").unwrap().name(),
            "Europe/Paris"
        );
        assert_eq!(TimeZoneSetting::parse("UTC").unwrap().name(), "UTC");
        assert_eq!(TimeZoneSetting::default().name(), "UTC");
        for bad in ["Europe/Pariss", "", "CEST+1", "../../etc/passwd"] {
            assert!(TimeZoneSetting::parse(bad).is_err(), "{bad}");
        }
    }

    /// Through the configuration: a bad zone or type is reported at its line; two issuers
    /// may not give one claim two types.
    #[test]
    fn the_configuration_reports_bad_declarations_at_their_line() {
        let base = std::path::Path::new("/");
        let issuer =
            "[[issuer]]\nissuer = \"https://a\"\naudiences = [\"x\"]\njwks_file = \"k.json\"\n";
        let e = crate::config::Settings::from_toml(
            &format!("{issuer}\n[policy]\ndir = \"p\"\ntime_zone = \"Europe/Pariss\"\n"),
            base,
        )
        .expect_err("bad zone");
        assert_eq!(e.problems()[0].line(), Some(8), "{e}");
        assert!(
            e.problems()[0]
                .message()
                .contains("\"Europe/Pariss\" is not a time zone"),
            "{e}"
        );
        let e = crate::config::Settings::from_toml(
            &format!("{issuer}[issuer.claims]\nlevel = \"Integer\"\n"),
            base,
        )
        .expect_err("bad type");
        assert_eq!(e.problems()[0].line(), Some(6), "{e}");
        assert!(
            e.problems()[0]
                .message()
                .contains("\"Integer\" is not a claim type"),
            "{e}"
        );
        let second = issuer.replace("https://a", "https://b");
        let e = crate::config::Settings::from_toml(
            &format!("{issuer}[issuer.claims]\nlevel = \"Long\"\n{second}[issuer.claims]\nlevel = \"String\"\n"),
            base,
        )
        .expect_err("two types");
        assert!(
            e.messages().iter().any(|m| m
                .contains("claims.level: declared String here and Long by issuer \"https://a\"")),
            "{e}"
        );
        let ok = crate::config::Settings::from_toml(
            &format!("{issuer}[issuer.claims]\nlevel = \"Long\"\nroles = \"Set<String>\"\n[policy]\ntime_zone = \"America/New_York\"\n"),
            base,
        )
        .expect("valid");
        assert_eq!(ok.policy.time_zone.name(), "America/New_York");
        assert_eq!(ok.issuers[0].claims.len(), 2);
    }
}
