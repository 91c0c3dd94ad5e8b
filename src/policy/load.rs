//! Loading Cedar material: `*.cedar` files, the optional schema and entities file in; a
//! validated [`PolicySnapshot`] out, or every problem found, each with file and line.

use crate::config::{PolicySettings, line_col};
use crate::problem::Problem;
use cedar_policy::{Entities, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// An immutable, validated set of policies with the static entities they use.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub(crate) policies: PolicySet,
    /// The policies by scope: a request evaluates only those that can match it.
    pub(crate) index: super::index::PolicyIndex,
    /// The static entities, closed once per load.
    pub(crate) store: super::store::EntityStore,
    pub(crate) schema: Option<Schema>,
    /// Request headers kept out of the Cedar context (see `PolicySettings::hidden_headers`).
    pub(crate) hidden_headers: Vec<String>,
    /// What the policies can read of the context and of a token's user.
    pub(crate) demand: std::sync::Arc<super::demand::Demand>,
    /// The zone of `context.time`'s local fields.
    pub(crate) time_zone: Arc<crate::declared::TimeZoneSetting>,
}

impl PolicySnapshot {
    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }
    pub fn has_schema(&self) -> bool {
        self.schema.is_some()
    }
}

/// `file:line:col: message` for a diagnostic whose first label points into `text`.
fn located(file: &Path, text: &str, d: &dyn Diagnostic, message: String) -> Problem {
    let offset = d
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset());
    let mut problem = Problem::new(message).in_file(file);
    if let Some(help) = d.help() {
        problem = problem.with_help(help.to_string());
    }
    match offset {
        Some(o) => {
            let (line, col) = line_col(text, o);
            problem.at(line, col)
        }
        None => problem,
    }
}

fn read(path: &Path, problems: &mut Vec<Problem>) -> Option<String> {
    crate::files::read_to_string(path)
        .map_err(|e| problems.push(Problem::new(e.to_string())))
        .ok()
}

fn load_schema(path: &Path, problems: &mut Vec<Problem>) -> Option<Schema> {
    let text = read(path, problems)?;
    if path.extension().is_some_and(|e| e == "json") {
        return Schema::from_json_str(&text)
            .map_err(|e| problems.push(located(path, &text, &e, e.to_string())))
            .ok();
    }
    match Schema::from_cedarschema_str(&text) {
        Ok((schema, warnings)) => {
            for w in warnings {
                tracing::warn!(file = %path.display(), "schema: {w}");
            }
            Some(schema)
        }
        Err(e) => {
            problems.push(located(path, &text, &e, e.to_string()));
            None
        }
    }
}

/// Where each policy came from, to point validation errors at file and line.
/// Each policy's file and text; a file's text is shared by its policies (10,000 policies in
/// one file must not make 10,000 copies of it).
type Sources = HashMap<PolicyId, (Arc<PathBuf>, Arc<str>)>;

fn load_policy_dir(dir: &Path, problems: &mut Vec<Problem>) -> (PolicySet, Sources) {
    let mut set = PolicySet::new();
    let mut sources = Sources::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            // SECURITY: every `*.cedar` entry is read (and refused if it is not a regular
            // file): a policy replaced by a FIFO or a directory must fail the load, not
            // silently drop out of the set.
            .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
            .collect(),
        Err(e) => {
            problems.push(Problem::new(format!(
                "{}: cannot read policy directory: {e}",
                dir.display()
            )));
            return (set, sources);
        }
    };
    files.sort();
    if files.is_empty() {
        problems.push(Problem::new(format!("{}: no *.cedar policy files", dir.display())));
    }
    for file in files {
        let Some(text) = read(&file, problems) else {
            continue;
        };
        let parsed = match PolicySet::from_str(&text) {
            Ok(p) => p,
            Err(errs) => {
                for e in errs.iter() {
                    problems.push(located(&file, &text, e, e.to_string()));
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            problems.push(Problem::new(format!(
                "{}: policy templates are not supported; write static policies",
                file.display()
            )));
        }
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Cedar names the policies of one text policy0, policy1, ... in source order.
        let mut policies: Vec<_> = parsed.policies().collect();
        policies.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        let (shared_file, shared_text) = (Arc::new(file.clone()), Arc::<str>::from(text.as_str()));
        for (i, policy) in policies.into_iter().enumerate() {
            let id = match policy.annotation("id") {
                Some(id) if id.trim().is_empty() => {
                    problems.push(Problem::new(format!(
                        "{}: policy #{} has an empty @id",
                        file.display(),
                        i + 1
                    )));
                    continue;
                }
                Some(id) => id.to_string(),
                None => format!("{name}#{}", i + 1),
            };
            let pid = PolicyId::new(&id);
            if let Some((other, _)) = sources.get(&pid) {
                problems.push(Problem::new(format!(
                    "{}: duplicate policy id \"{id}\" (also in {})",
                    file.display(),
                    other.display()
                )));
                continue;
            }
            match set.add(policy.new_id(pid.clone())) {
                Ok(()) => {
                    sources.insert(pid, (shared_file.clone(), shared_text.clone()));
                }
                Err(e) => problems.push(Problem::new(format!("{}: {e}", file.display()))),
            }
        }
    }
    (set, sources)
}

/// What to declare for an attribute the schema does not have, when the policy reads a part
/// of the context that the configuration decides: a token claim, a request header, the
/// time. `None` for anything else (Cedar's own message says enough).
fn declaration_hint(e: &cedar_policy::ValidationError, text: &str) -> Option<String> {
    if !matches!(e, cedar_policy::ValidationError::UnsafeAttributeAccess(_)) {
        return None;
    }
    let label = e.labels()?.next()?;
    let read = text.get(label.offset()..label.offset() + label.len())?;
    let mut read: String = read.split_whitespace().collect();
    // Cedar may point at the record that lacks the field (`context.token.claims`): name
    // the field the policy goes on to read.
    let after = text.get(label.offset() + label.len()..).unwrap_or_default();
    if let Some(next) = field_name(after.trim_start()) {
        read = format!("{read}[\"{next}\"]");
    }
    const SCHEMA: &str = "(`portcullis schema --config FILE` prints one)";
    if let Some(rest) = read.strip_prefix("context.token.claims") {
        let claim = field_name(rest);
        return Some(match claim {
            Some(claim) => format!(
                "the policy reads context.token.claims.{claim}: declare it with `[issuer.claims] {claim} = \"String\"` (or \"Long\", \"Bool\", \"Set<String>\") in the configuration and in the schema {SCHEMA}"
            ),
            None => format!(
                "the policy reads context.token.claims: declare the claims it reads in `[issuer.claims]` and use a schema with a claims record in TokenInfo {SCHEMA}"
            ),
        });
    }
    if let Some(rest) = read.strip_prefix("context.request.headers") {
        let header = field_name(rest)?;
        return Some(format!(
            "the policy reads the request header \"{header}\": declare it in the schema's headers record as `\"{header}\"?: String` (`portcullis schema` does not write headers: keep that line when you regenerate the schema)"
        ));
    }
    if read.starts_with("context.time") {
        return Some(format!(
            "the policy reads context.time: use a schema that declares it (type TimeInfo) {SCHEMA}"
        ));
    }
    None
}

/// The first field named by `.name` or `["name"]` at the start of `rest`.
fn field_name(rest: &str) -> Option<String> {
    if let Some(dotted) = rest.strip_prefix('.') {
        let name: String = dotted
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return (!name.is_empty()).then_some(name);
    }
    let quoted = rest.strip_prefix("[\"")?;
    quoted.split_once("\"]").map(|(name, _)| name.to_string())
}

/// Loads and validates everything the policy settings name.
pub fn load(settings: &PolicySettings) -> Result<PolicySnapshot, Vec<Problem>> {
    let mut problems = Vec::new();
    let schema = settings
        .schema
        .as_deref()
        .and_then(|p| load_schema(p, &mut problems));
    let (policies, sources) = load_policy_dir(&settings.dir, &mut problems);

    if let Some(schema) = &schema {
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        let mut hinted = std::collections::HashSet::new();
        for e in result.validation_errors() {
            match sources.get(e.policy_id()) {
                Some((file, text)) => {
                    let mut message = e.to_string();
                    if let Some(hint) = declaration_hint(e, text) {
                        // Cedar reports the access once per action; the declaration is one.
                        let at = e.labels().and_then(|mut l| l.next()).map(|l| l.offset());
                        if !hinted.insert((e.policy_id().clone(), at, hint.clone())) {
                            continue;
                        }
                        message = format!("{message}; {hint}");
                    }
                    problems.push(located(file, text, e, message));
                }
                None => problems.push(Problem::new(format!("policy \"{}\": {e}", e.policy_id()))),
            }
        }
    }

    let entities = match &settings.entities {
        None => match &schema {
            // The schema's action entities, so `action in Action::"<group>"` works.
            Some(s) => s.action_entities().unwrap_or_else(|e| {
                problems.push(Problem::new(format!("schema actions: {e}")));
                Entities::empty()
            }),
            None => Entities::empty(),
        },
        Some(path) => match read(path, &mut problems) {
            Some(text) => Entities::from_json_str(&text, schema.as_ref()).unwrap_or_else(|e| {
                problems.push(located(path, &text, &e, e.to_string()));
                Entities::empty()
            }),
            None => Entities::empty(),
        },
    };

    if problems.is_empty() {
        Ok(PolicySnapshot {
            index: super::index::PolicyIndex::new(&policies),
            demand: std::sync::Arc::new(
                super::demand::Demand::of(&policies).with_claims(
                    // With a schema, only the declared claims: what the validator reasoned
                    // with (its claims record is closed).
                    schema
                        .as_ref()
                        .and(settings.declared_claims.clone())
                        .map(std::sync::Arc::new),
                ),
            ),
            policies,
            store: super::store::EntityStore::new(entities),
            schema,
            hidden_headers: settings.hidden_headers.clone(),
            time_zone: Arc::new(settings.time_zone.clone()),
        })
    } else {
        Err(problems)
    }
}

/// The settings of a candidate policy directory (`[policy] shadow_dir`, `portcullis replay
/// --policies`): its own `schema.cedarschema` (or `schema.cedarschema.json`) and
/// `entities.json` when it has them, else those of `live`, as `portcullis test` finds them.
pub fn candidate(dir: &Path, live: &PolicySettings) -> PolicySettings {
    let own = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    PolicySettings {
        dir: dir.to_path_buf(),
        schema: own("schema.cedarschema")
            .or_else(|| own("schema.cedarschema.json"))
            .or_else(|| live.schema.clone()),
        entities: own("entities.json").or_else(|| live.entities.clone()),
        hidden_headers: live.hidden_headers.clone(),
        time_zone: live.time_zone.clone(),
        declared_claims: live.declared_claims.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `policy` against `schema`: every problem.
    fn problems(policy: &str, schema: &str) -> Vec<Problem> {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("p.cedar"), policy).expect("policy");
        std::fs::write(dir.path().join("s.cedarschema"), schema).expect("schema");
        load(&PolicySettings {
            dir: dir.path().to_path_buf(),
            schema: Some(dir.path().join("s.cedarschema")),
            entities: None,
            hidden_headers: Vec::new(),
            time_zone: Default::default(),
            declared_claims: None,
        })
        .expect_err("invalid")
    }

    /// The one problem of `policy` against `schema`, as text.
    fn problem(policy: &str, schema: &str) -> String {
        let problems = problems(policy, schema);
        // Cedar reports the access once per action; a declaration hint once.
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems[0].to_string()
    }

    /// The first problem of `policy` against `schema`, as text.
    fn problem_any(policy: &str, schema: &str) -> String {
        problems(policy, schema)[0].to_string()
    }

    const SHIPPED: &str = include_str!("../../policies/schema.cedarschema");

    #[test]
    fn an_undeclared_attribute_names_its_declaration() {
        let p = problem(
            "permit (principal, action, resource)\nwhen { context has token &&\n  context.token.claims.team == \"x\" };",
            SHIPPED,
        );
        assert!(p.contains("p.cedar:3:"), "{p}");
        assert!(
            p.contains("the policy reads context.token.claims.team: declare it with `[issuer.claims] team = \"String\"`"),
            "{p}"
        );
        let p = problem(
            "permit (principal, action, resource) when { context.request.headers[\"x-tenant\"] == \"a\" };",
            SHIPPED,
        );
        assert!(p.contains("the policy reads the request header \"x-tenant\": declare it in the schema's headers record as `\"x-tenant\"?: String`"), "{p}");
        // A schema from before claims and time: the field the policy goes on to read.
        let old = SHIPPED.replace("  time: TimeInfo,\n", "");
        let p = problem(
            "permit (principal, action, resource) when { context.time.hour > 8 };",
            &old,
        );
        assert!(p.contains("the policy reads context.time: use a schema that declares it"), "{p}");
        let start = old.find("  // The claims the issuers").expect("claims");
        let end = old[start..].find("  },\n").expect("end") + start + 5;
        let old = format!("{}{}", &old[..start], &old[end..]);
        let p = problem(
            "permit (principal, action, resource) when { context has token && context.token.claims.department == \"x\" };",
            &old,
        );
        assert!(p.contains("the policy reads context.token.claims.department: declare it with `[issuer.claims] department = \"String\"`"), "{p}");
        // Anything else keeps Cedar's message alone (once per action, as Cedar says it).
        let p = problem_any(
            "permit (principal, action, resource) when { principal.nope == 1 };",
            SHIPPED,
        );
        assert!(!p.contains("declare"), "{p}");
    }
}
