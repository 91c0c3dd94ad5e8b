//! An engine from parts, for a program that holds its configuration itself rather than in a
//! Portcullis TOML file. The parts become the same configuration document a file would be,
//! so they meet the same validation, the same defaults and the same error reports.

use crate::config::Settings;
use crate::engine::Engine;
use crate::problem::{LoadError, Problem};
use std::path::{Path, PathBuf};

/// Builds an [`Engine`] from parts: policies, trust material, issuers, and any other
/// setting by its configuration key. Relative paths are resolved against
/// [`EngineBuilder::base_dir`] (the working directory by default).
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # std::fs::create_dir(dir.path().join("policies"))?;
/// # std::fs::write(dir.path().join("policies/p.cedar"), "permit (principal, action, resource);")?;
/// # let signer = portcullis::demo::TokenSigner::generate(jsonwebtoken::Algorithm::ES256, "k1");
/// # std::fs::write(dir.path().join("idp.jwks.json"), portcullis::demo::jwks(&[&signer]))?;
/// let engine = portcullis::Engine::builder()
///     .base_dir(dir.path())
///     .policies("policies")
///     .issuer("https://idp.example.org", &["orders"], "idp.jwks.json")
///     .set("limits.request_timeout", "250ms")
///     .build()?;
/// assert_eq!(engine.policy_count(), 1);
///
/// // A part that is wrong is reported as a file's would be, every problem at once:
/// let error = portcullis::Engine::builder()
///     .base_dir(dir.path())
///     .policies("policies")
///     .set("limits.request_timeout", "soon")
///     .set("limits.max_concurent", 8)
///     .build()
///     .unwrap_err();
/// assert!(error.to_string().contains("max_concurent"), "{error}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct EngineBuilder {
    base: Option<PathBuf>,
    document: toml::Table,
    problems: Vec<Problem>,
}

impl EngineBuilder {
    /// The directory relative paths are resolved against.
    pub fn base_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.base = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The directory of `*.cedar` policy files (`[policy] dir`).
    pub fn policies(self, dir: impl AsRef<Path>) -> Self {
        self.set_path("policy.dir", dir.as_ref())
    }

    /// A Cedar schema to validate the policies against (`[policy] schema`).
    pub fn schema(self, file: impl AsRef<Path>) -> Self {
        self.set_path("policy.schema", file.as_ref())
    }

    /// Static entities, Cedar JSON (`[policy] entities`).
    pub fn entities(self, file: impl AsRef<Path>) -> Self {
        self.set_path("policy.entities", file.as_ref())
    }

    /// The CA certificates client certificates must chain to (`[peer] trust_bundle`).
    pub fn trust_bundle(self, file: impl AsRef<Path>) -> Self {
        self.set_path("peer.trust_bundle", file.as_ref())
    }

    /// A trusted token issuer whose keys are a JWKS file (one `[[issuer]]`), with every
    /// other issuer setting at its default.
    pub fn issuer(mut self, issuer: &str, audiences: &[&str], jwks_file: impl AsRef<Path>) -> Self {
        let mut table = toml::Table::new();
        table.insert("issuer".into(), issuer.into());
        table.insert(
            "audiences".into(),
            toml::Value::Array(audiences.iter().map(|a| (*a).into()).collect()),
        );
        match path_text(jwks_file.as_ref()) {
            Ok(path) => {
                table.insert("jwks_file".into(), path.into());
            }
            Err(problem) => self.problems.push(problem),
        }
        let issuers = self
            .document
            .entry("issuer")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        if let toml::Value::Array(list) = issuers {
            list.push(toml::Value::Table(table));
        }
        self
    }

    /// Any setting by its configuration key, as in the file: `"limits.request_timeout"`
    /// with `"250ms"`, `"peer.require"` with `true`. Checked with the rest at
    /// [`EngineBuilder::build`]; an unknown key is an error there.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let mut parts: Vec<&str> = key.split('.').collect();
        let Some(last) = parts.pop().filter(|l| !l.is_empty()) else {
            self.problems
                .push(Problem::new(format!("\"{key}\" is not a configuration key")));
            return self;
        };
        let mut table = &mut self.document;
        for part in parts {
            let entry = table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(inner) => table = inner,
                _ => {
                    self.problems.push(Problem::new(format!(
                        "\"{key}\": \"{part}\" is a value, not a table"
                    )));
                    return self;
                }
            }
        }
        table.insert(last.to_string(), value.into());
        self
    }

    fn set_path(mut self, key: &str, path: &Path) -> Self {
        match path_text(path) {
            Ok(text) => self.set(key, text),
            Err(problem) => {
                self.problems.push(problem);
                self
            }
        }
    }

    /// The settings the parts make, validated as a configuration file is.
    pub fn settings(self) -> Result<Settings, LoadError> {
        if !self.problems.is_empty() {
            return Err(LoadError::new("in the engine's parts", self.problems));
        }
        let text = toml::to_string(&self.document).map_err(|e| {
            LoadError::new("in the engine's parts", vec![Problem::new(e.to_string())])
        })?;
        Settings::from_toml(&text, self.base.as_deref().unwrap_or(Path::new("")))
    }

    /// The engine the parts make: every problem in them, or in the files they name, at once.
    pub fn build(self) -> Result<Engine, LoadError> {
        Engine::load(&self.settings()?)
    }
}

/// A path as configuration text; a path that is not UTF-8 cannot be written in one.
fn path_text(path: &Path) -> Result<String, Problem> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Problem::new(format!("{}: path is not UTF-8", path.display())))
}

impl Engine {
    /// An engine from parts rather than a configuration file: see [`EngineBuilder`].
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }
}
