//! `portcullis replay`: recorded decisions (audit lines with `[audit] record_requests`) and
//! a candidate policy set in; every decision the candidate would decide otherwise out,
//! grouped by the policies that make the difference.
//!
//! SECURITY: an audit file is operator input that may have been tampered with. It is read
//! line by line (bounded memory: a line longer than [`MAX_LINE`] is skipped, not held), and
//! every line that cannot be read is reported with its file and line number; none stops
//! the replay.

use crate::config::{PolicySettings, Settings};
use crate::policy::{self, PolicySnapshot, RecordedRequest};
use crate::problem::{LoadError, Problem};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest audit line read (a decision line with its recorded request is a few KiB).
pub const MAX_LINE: usize = 1024 * 1024;

/// Most unreadable lines listed one by one (all are counted).
const MAX_LISTED_ERRORS: usize = 100;

/// Whether access is gained or lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// Denied then, allowed by the candidate policies.
    Gained,
    /// Allowed then, denied by the candidate policies.
    Lost,
}

/// One decision the candidate policies would change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Change {
    /// Gained or lost.
    pub direction: Direction,
    /// `file:line` of the audit line.
    pub at: String,
    /// The decision's time, as its line says.
    pub time: String,
    /// The audit line's `seq`, when it has one.
    pub seq: Option<u64>,
    /// The principal.
    pub principal: String,
    /// The action.
    pub action: String,
    /// The resource.
    pub resource: String,
    /// The policies that determined the recorded decision.
    pub was: Vec<String>,
    /// The candidate set's verdict.
    pub now: policy::Verdict,
}

/// What a replay found.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Report {
    /// The candidate policy directory.
    pub policies: PathBuf,
    /// Decisions re-evaluated.
    pub replayed: usize,
    /// Of those, the ones the candidate would allow and that were denied.
    pub gained: usize,
    /// Of those, the ones the candidate would deny and that were allowed.
    pub lost: usize,
    /// Gained access by the candidate's determining policy (a request counts once per policy).
    pub gained_by: BTreeMap<String, usize>,
    /// Lost access by the recorded determining policy.
    pub lost_by: BTreeMap<String, usize>,
    /// The first `limit` changes.
    pub changes: Vec<Change>,
    /// Decisions that reached the policies but whose line has no recorded request.
    pub no_record: usize,
    /// Decisions that never reached the policies (a rejected credential, overload, ...).
    pub not_reached: usize,
    /// Lines that are not decisions (checkpoints, security events).
    pub other_lines: usize,
    /// Lines that could not be read.
    pub unreadable: usize,
    /// The first of them, each with its place (`file:line: why`).
    pub errors: Vec<String>,
}

impl Report {
    /// Whether any decision would change.
    pub fn changed(&self) -> bool {
        self.gained + self.lost > 0
    }
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        "no policy".into()
    } else {
        ids.join(", ")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let changed = self.gained + self.lost;
        writeln!(
            f,
            "replayed {} decision{} against {}: {changed} would change ({} gained, {} lost), {} unchanged",
            self.replayed,
            if self.replayed == 1 { "" } else { "s" },
            self.policies.display(),
            self.gained,
            self.lost,
            self.replayed - changed,
        )?;
        if self.gained > 0 {
            writeln!(f, "gained access: {} request(s)", self.gained)?;
            for (id, n) in &self.gained_by {
                writeln!(f, "  allowed by {id}: {n}")?;
            }
        }
        if self.lost > 0 {
            writeln!(f, "lost access: {} request(s)", self.lost)?;
            for (id, n) in &self.lost_by {
                writeln!(f, "  was allowed by {id}: {n}")?;
            }
        }
        if self.no_record > 0 {
            writeln!(
                f,
                "not replayed: {} decision(s) had no recorded request: enable [audit] record_requests",
                self.no_record
            )?;
        }
        if self.not_reached > 0 {
            writeln!(
                f,
                "unchanged: {} decision(s) never reached the policies (credential rejected, overload, ...)",
                self.not_reached
            )?;
        }
        if self.unreadable > 0 {
            writeln!(f, "unreadable: {} line(s)", self.unreadable)?;
            for e in &self.errors {
                writeln!(f, "  {e}")?;
            }
            if self.unreadable > self.errors.len() {
                writeln!(f, "  ... and {} more", self.unreadable - self.errors.len())?;
            }
        }
        if !self.changes.is_empty() {
            writeln!(f, "changes (first {} of {changed}):", self.changes.len())?;
            for c in &self.changes {
                let seq = c.seq.map(|s| format!(" seq {s}")).unwrap_or_default();
                let what = match c.direction {
                    Direction::Gained => {
                        format!("gained: now allowed by {}", list(&c.now.determining))
                    }
                    Direction::Lost => {
                        let now = if !c.now.errors.is_empty() {
                            format!("evaluation error: {}", c.now.errors.join("; "))
                        } else if c.now.determining.is_empty() {
                            "no permit".into()
                        } else {
                            format!("forbidden by {}", c.now.determining.join(", "))
                        };
                        format!("lost: was allowed by {}, now denied ({now})", list(&c.was))
                    }
                };
                writeln!(
                    f,
                    "  {} {} {} at {}{seq} ({}): {what}",
                    c.principal, c.action, c.resource, c.time, c.at
                )?;
            }
        }
        Ok(())
    }
}

/// The fields of one decision line, in either audit format.
struct Line<'a> {
    allowed: bool,
    policies: Vec<String>,
    time: String,
    seq: Option<u64>,
    principal: Option<&'a str>,
    record: Option<&'a Value>,
}

/// A decision line's fields (`json` or `ecs` format); `Ok(None)` for another kind of line.
fn decision_line(v: &Value) -> Result<Option<Line<'_>>, String> {
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let ecs = v.get("ecs").is_some();
    let at = |json: &str, ecs_path: &str| {
        if ecs {
            v.pointer(ecs_path)
        } else {
            v.get(json)
        }
    };
    if ecs {
        if v.pointer("/event/action").and_then(Value::as_str) != Some("authorization-decision") {
            return Ok(None);
        }
    } else if v.get("type").is_some() {
        return Ok(None);
    }
    let allowed = if ecs {
        match v.pointer("/portcullis/decision").and_then(Value::as_str) {
            Some("allow") => true,
            Some("deny") => false,
            _ => return Err("no \"portcullis.decision\" of \"allow\" or \"deny\"".into()),
        }
    } else {
        match v.get("decision").and_then(Value::as_str) {
            Some("allow") => true,
            Some("deny") => false,
            _ => return Err("no \"decision\" of \"allow\" or \"deny\"".into()),
        }
    };
    let policies = match at("policies", "/rule/id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|id| id.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("\"policies\": expected strings")?,
        Some(_) => return Err("\"policies\": expected an array".into()),
    };
    let text = |json: &str, ecs_path: &str| at(json, ecs_path).and_then(Value::as_str);
    Ok(Some(Line {
        allowed,
        policies,
        time: text("time", "/@timestamp").unwrap_or("?").to_string(),
        seq: at("seq", "/portcullis/chain/seq").and_then(Value::as_u64),
        principal: text("principal", "/user/id"),
        record: at("cedar_request", "/portcullis/cedar_request").filter(|r| !r.is_null()),
    }))
}

/// Reads one line of at most [`MAX_LINE`] bytes into `buf` (without its newline).
/// `Ok(None)` at the end; `Ok(Some(false))` for a longer line, skipped to its end.
fn next_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(true));
    }
    if buf.len() <= MAX_LINE {
        // The last line, without a newline.
        return Ok(Some(true));
    }
    // Too long: skip to the end of the line without holding it.
    loop {
        let (done, used) = {
            let chunk = reader.fill_buf()?;
            if chunk.is_empty() {
                (true, 0)
            } else {
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => (true, i + 1),
                    None => (false, chunk.len()),
                }
            }
        };
        reader.consume(used);
        if done {
            buf.clear();
            return Ok(Some(false));
        }
    }
}

/// The candidate set: `dir` with its own schema and entities when present, else those of
/// `live` (the configuration's `[policy]`).
pub fn load_candidate(dir: &Path, live: Option<&Settings>) -> Result<PolicySnapshot, LoadError> {
    let base = live.map_or_else(
        || PolicySettings {
            dir: dir.to_path_buf(),
            schema: None,
            entities: None,
            hidden_headers: Vec::new(),
            time_zone: Default::default(),
            declared_claims: None,
        },
        |s| s.policy.clone(),
    );
    policy::load(&policy::candidate(dir, &base))
        .map_err(|problems| LoadError::new(format!("loading {}", dir.display()), problems))
}

/// Replays every decision of `files` (oldest first) against `candidate`, keeping the
/// first `limit` changes. Fails only when a file cannot be opened or read.
pub fn replay(
    candidate: &PolicySnapshot,
    policies: &Path,
    files: &[PathBuf],
    limit: usize,
) -> Result<Report, LoadError> {
    let mut report = Report {
        policies: policies.to_path_buf(),
        ..Report::default()
    };
    for file in files {
        let opened = std::fs::File::open(file).map_err(|e| {
            LoadError::new(
                "replaying",
                vec![Problem::new(format!(
                    "{}: cannot open: {e}",
                    file.display()
                ))],
            )
        })?;
        let mut reader = BufReader::new(opened);
        let mut buf = Vec::new();
        let mut number = 0usize;
        loop {
            let read = next_line(&mut reader, &mut buf).map_err(|e| {
                LoadError::new(
                    "replaying",
                    vec![Problem::new(format!(
                        "{}:{}: cannot read: {e}",
                        file.display(),
                        number + 1
                    ))],
                )
            })?;
            let Some(whole) = read else { break };
            number += 1;
            let at = format!("{}:{number}", file.display());
            if !whole {
                report.error(format!("{at}: longer than {MAX_LINE} bytes"));
                continue;
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Err(e) = report.line(candidate, &buf, &at, limit) {
                report.error(format!("{at}: {e}"));
            }
        }
    }
    Ok(report)
}

impl Report {
    fn error(&mut self, message: String) {
        self.unreadable += 1;
        if self.errors.len() < MAX_LISTED_ERRORS {
            self.errors.push(message);
        }
    }

    fn line(
        &mut self,
        candidate: &PolicySnapshot,
        bytes: &[u8],
        at: &str,
        limit: usize,
    ) -> Result<(), String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Some(line) = decision_line(&value)? else {
            self.other_lines += 1;
            return Ok(());
        };
        let Some(record) = line.record else {
            if line.principal.is_some() {
                self.no_record += 1;
            } else {
                self.not_reached += 1;
            }
            return Ok(());
        };
        let request =
            RecordedRequest::from_json(record).map_err(|e| format!("recorded request: {e}"))?;
        let now = candidate.judge_recorded(&request);
        self.replayed += 1;
        let direction = match (line.allowed, now.allowed) {
            (false, true) => Direction::Gained,
            (true, false) => Direction::Lost,
            _ => return Ok(()),
        };
        match direction {
            Direction::Gained => {
                self.gained += 1;
                for id in &now.determining {
                    *self.gained_by.entry(id.clone()).or_default() += 1;
                }
            }
            Direction::Lost => {
                self.lost += 1;
                if line.policies.is_empty() {
                    *self.lost_by.entry("no policy".into()).or_default() += 1;
                }
                for id in &line.policies {
                    *self.lost_by.entry(id.clone()).or_default() += 1;
                }
            }
        }
        if self.changes.len() < limit {
            self.changes.push(Change {
                direction,
                at: at.to_string(),
                time: line.time,
                seq: line.seq,
                principal: request.principal.to_string(),
                action: request.action.to_string(),
                resource: request.resource.to_string(),
                was: line.policies,
                now,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn long_lines_are_skipped_without_being_held() {
        let mut text = b"a\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        text.extend(b"\nb\nlast");
        let mut reader = BufReader::with_capacity(64, Cursor::new(text));
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        while let Some(whole) = next_line(&mut reader, &mut buf).expect("read") {
            seen.push((whole, String::from_utf8_lossy(&buf).into_owned()));
        }
        assert_eq!(
            seen,
            [
                (true, "a".to_string()),
                (false, String::new()),
                (true, "b".to_string()),
                (true, "last".to_string())
            ]
        );
    }

    /// An ECS line carries the same decision as the JSON line it was mapped from.
    #[test]
    fn ecs_lines_are_read_like_json_lines() {
        let record = serde_json::json!({"principal": {"type": "User", "id": "a"},
            "action": {"type": "Action", "id": "GET"}, "resource": {"type": "Path", "id": "/"},
            "parents": [], "context": {}});
        let json = serde_json::json!({"time": "t", "decision": "allow", "principal": "User::\"a\"",
            "policies": ["p"], "seq": 4, "cedar_request": record, "reasons": []});
        let ecs = crate::audit::ecs::ecs(&json);
        for v in [&json, &ecs] {
            let line = decision_line(v)
                .expect("a decision")
                .expect("a decision line");
            assert!(line.allowed);
            assert_eq!(line.policies, ["p"]);
            assert_eq!((line.time.as_str(), line.seq), ("t", Some(4)));
            assert_eq!(line.principal, Some("User::\"a\""));
            assert_eq!(line.record, Some(&record));
        }
        let deny =
            serde_json::json!({"decision": "deny", "principal": null, "reason": "invalid_token"});
        let deny = crate::audit::ecs::ecs(&deny);
        let line = decision_line(&deny).expect("ok").expect("line");
        assert!(!line.allowed && line.principal.is_none() && line.record.is_none());
    }

    #[test]
    fn hostile_lines_are_errors_or_other_lines() {
        let cases: &[(&str, Result<bool, ()>)] = &[
            ("[]", Err(())),
            ("3", Err(())),
            (r#"{"decision": "maybe"}"#, Err(())),
            (r#"{"decision": "allow", "policies": "p"}"#, Err(())),
            (r#"{"decision": "allow", "policies": [1]}"#, Err(())),
            (r#"{"type": "checkpoint"}"#, Ok(false)),
            (
                r#"{"ecs": {}, "event": {"action": "checkpoint"}}"#,
                Ok(false),
            ),
            (r#"{"decision": "deny", "principal": null}"#, Ok(true)),
        ];
        for (text, expected) in cases {
            let v: Value = serde_json::from_str(text).expect("json");
            let got = decision_line(&v).map(|l| l.is_some()).map_err(|_| ());
            assert_eq!(&got, expected, "{text}");
        }
    }
}
