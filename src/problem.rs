//! Load errors: every problem found in a configuration, its policies or its trust material,
//! each with where it is when that is known (file, line, column) and a hint when there is
//! one. Loading never stops at the first problem: an operator fixes them all in one pass.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found while loading, with its location when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    file: Option<PathBuf>,
    /// One-based line and column.
    position: Option<(usize, usize)>,
    message: String,
    help: Option<String>,
}

impl Problem {
    /// A problem with no location yet.
    pub fn new(message: impl Into<String>) -> Problem {
        Problem {
            file: None,
            position: None,
            message: message.into(),
            help: None,
        }
    }

    /// The same problem, in `file`.
    pub fn in_file(mut self, file: &Path) -> Problem {
        self.file = Some(file.to_path_buf());
        self
    }

    /// The same problem, at a one-based line and column of its file.
    pub fn at(mut self, line: usize, column: usize) -> Problem {
        self.position = Some((line, column));
        self
    }

    /// The same problem, with a hint at the fix.
    pub fn with_help(mut self, help: impl Into<String>) -> Problem {
        self.help = Some(help.into());
        self
    }

    /// The file the problem is in, when known.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The one-based line of the problem in its file, when known.
    pub fn line(&self) -> Option<usize> {
        self.position.map(|(line, _)| line)
    }

    /// The one-based column of the problem in its line, when known.
    pub fn column(&self) -> Option<usize> {
        self.position.map(|(_, column)| column)
    }

    /// What is wrong, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A hint at the fix, when there is one.
    pub fn help(&self) -> Option<&str> {
        self.help.as_deref()
    }
}

/// `file:line:column: message (help: ...)`, each part when known.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.position) {
            (Some(file), Some((line, column))) => write!(f, "{}:{line}:{column}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some((line, column))) => write!(f, "line {line}, column {column}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, " (help: {help})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl miette::Diagnostic for Problem {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
}

/// Why loading failed: every problem found, in the order found. Its `Display` is the
/// report the binary prints; [`LoadError::problems`] gives each problem with its location;
/// as a [`miette::Diagnostic`] each problem is a related diagnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// What was being loaded, for the report's first line (`in configuration x.toml`).
    what: String,
    problems: Vec<Problem>,
}

impl LoadError {
    /// Problems found loading `what` (shown as "N problem(s) {what}:").
    pub(crate) fn new(what: impl Into<String>, problems: Vec<Problem>) -> LoadError {
        LoadError {
            what: what.into(),
            problems,
        }
    }

    /// The same problems, reported as found loading `path`.
    pub fn loading(mut self, path: &Path) -> LoadError {
        self.what = format!("loading {}", path.display());
        self
    }

    /// Every problem found.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Every problem, as one line of text each.
    pub fn messages(&self) -> Vec<String> {
        self.problems.iter().map(Problem::to_string).collect()
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s)", self.problems.len())?;
        if !self.what.is_empty() {
            write!(f, " {}", self.what)?;
        }
        f.write_str(":")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

impl miette::Diagnostic for LoadError {
    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        Some(Box::new(
            self.problems.iter().map(|p| p as &dyn miette::Diagnostic),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_shows_what_of_its_location_is_known() {
        let p = Problem::new("unknown key").in_file(Path::new("a.toml")).at(3, 7);
        assert_eq!(p.to_string(), "a.toml:3:7: unknown key");
        assert_eq!((p.line(), p.column()), (Some(3), Some(7)));
        let p = Problem::new("missing").in_file(Path::new("k.json"));
        assert_eq!(p.to_string(), "k.json: missing");
        assert_eq!(
            Problem::new("bad").with_help("use x").to_string(),
            "bad (help: use x)"
        );
    }

    #[test]
    fn a_load_error_reports_every_problem() {
        let e = LoadError::new("", vec![Problem::new("one"), Problem::new("two")])
            .loading(Path::new("p.toml"));
        assert_eq!(e.to_string(), "2 problem(s) loading p.toml:\n  - one\n  - two");
        let related = miette::Diagnostic::related(&e).map_or(0, Iterator::count);
        assert_eq!(related, 2);
    }
}
