//! `portcullis audit verify`: reads audit files (oldest first) and checks the hash chain
//! across them and, with the public key, the signed checkpoints. Goes in: the files and the
//! key; comes out: a [`Report`], intact or the first broken line and what is wrong with it.

use super::chain::{
    CHECKPOINT_TYPE, GENESIS, checkpoint_message, ed25519_from_spki, key_id,
    read_key_file, sha256, signature_verifies,
};
use base64::Engine as _;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::PemObject;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The longest line read; a longer one is a broken line, never read into memory whole.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Why the files could not be checked at all (as opposed to a broken chain).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A file could not be opened or read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The public key file is unreadable or not an Ed25519 public key.
    #[error("{0}")]
    Key(String),
    /// No file was given.
    #[error("no audit file given")]
    NoFiles,
}

/// The Ed25519 public key that checkpoints are verified with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    raw: [u8; 32],
}

impl PublicKey {
    /// Reads an Ed25519 public key from a SubjectPublicKeyInfo PEM file (`PUBLIC KEY`, as
    /// `portcullis audit public-key` and `openssl pkey -pubout` write it).
    pub fn load(path: &Path) -> Result<PublicKey, VerifyError> {
        let bytes = read_key_file(path).map_err(VerifyError::Key)?;
        let der = SubjectPublicKeyInfoDer::from_pem_slice(&bytes).map_err(|_| {
            let private = bytes.windows(11).any(|w| w == b"PRIVATE KEY");
            VerifyError::Key(format!(
                "{}: no public key (a \"-----BEGIN PUBLIC KEY-----\" PEM block) in it{}",
                path.display(),
                if private {
                    "; it holds a private key, whose public key `portcullis audit public-key` prints"
                } else {
                    ""
                }
            ))
        })?;
        let raw = ed25519_from_spki(der.as_ref()).ok_or_else(|| {
            VerifyError::Key(format!("{}: not an ed25519 public key", path.display()))
        })?;
        Ok(PublicKey { raw })
    }

    /// From the raw 32 bytes.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn from_raw(raw: [u8; 32]) -> PublicKey {
        PublicKey { raw }
    }

    /// The id checkpoints signed by this key carry.
    pub fn key_id(&self) -> String {
        key_id(&self.raw)
    }
}

/// A fresh Ed25519 checkpoint signing key: (the private key as PKCS#8 PEM, its public key
/// as SubjectPublicKeyInfo PEM).
pub fn generate_key() -> Result<(String, String), String> {
    super::chain::generate_key()
}

/// The public key (SubjectPublicKeyInfo PEM) of the Ed25519 private key (PKCS#8 PEM) in
/// the file at `path`, to verify its checkpoints with.
pub fn public_key_pem(path: &Path) -> Result<String, String> {
    let signer = super::chain::Signer::load(path)?;
    Ok(super::chain::public_key_pem(&signer.public_key()))
}

/// What is wrong with the first broken line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// Longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// Not a JSON object (or not UTF-8).
    NotJson,
    /// No `seq` (a non-negative integer).
    NoSeq,
    /// No `prev` (64 lower-case hex digits).
    NoPrev,
    /// The chain's first line (seq 0) does not start from the genesis hash, or a line other
    /// than the first claims the genesis hash.
    BadGenesis,
    /// The seq is further on than the next one: lines were cut (or moved away).
    SeqJump {
        /// The seq that should have come.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The seq is not after the previous line's: lines were reordered or duplicated.
    SeqBack {
        /// The seq that should have come.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The seq is right but `prev` is not the hash of the line before.
    PrevMismatch,
    /// A checkpoint whose `covers` or `head` is not the line before it.
    CheckpointMismatch,
    /// A checkpoint without a readable `covers`, `head`, `every`, `key_id` or `sig`.
    CheckpointMalformed,
    /// A checkpoint signed by another key.
    OtherKey {
        /// The checkpoint's `key_id`.
        found: String,
        /// The given key's id.
        expected: String,
    },
    /// A checkpoint whose signature does not verify with the given key.
    BadSignature,
    /// More lines after a checkpoint than its `every`, without a new one.
    CheckpointMissing {
        /// The checkpoint's `every`.
        every: u64,
        /// Its seq.
        after_seq: u64,
    },
    /// With a key, no checkpoint was found at all.
    NoCheckpoint,
    /// A line without its newline at the end of a file that is not the last.
    TornInside,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::TooLong => write!(f, "the line is longer than {MAX_LINE_BYTES} bytes"),
            Problem::NotJson => f.write_str("the line is not a JSON object"),
            Problem::NoSeq => f.write_str("the line has no \"seq\": it is not part of a chain"),
            Problem::NoPrev => f.write_str("the line has no valid \"prev\" (64 hex digits)"),
            Problem::BadGenesis => f.write_str(
                "seq 0 and the genesis prev (all zeros) go together: one is here without the other",
            ),
            Problem::SeqJump { expected, found } => {
                let missing = found.saturating_sub(*expected);
                let (lines, seqs, verb) = if missing == 1 {
                    ("1 line".to_string(), format!("seq {expected}"), "was")
                } else {
                    (
                        format!("{missing} lines"),
                        format!("seq {expected} to {}", found.saturating_sub(1)),
                        "were",
                    )
                };
                write!(
                    f,
                    "seq is {found} where {expected} should come: {lines} ({seqs}) {verb} cut \
                     here, or moved elsewhere"
                )
            }
            Problem::SeqBack { expected, found } => write!(
                f,
                "seq goes back to {found} where {expected} should come: lines were reordered \
                 or duplicated"
            ),
            Problem::PrevMismatch => f.write_str(
                "prev does not match the line before: the line before was edited, or a line \
                 was removed, replaced or moved before this one",
            ),
            Problem::CheckpointMismatch => f.write_str(
                "the checkpoint's covers/head do not describe the line before it: lines before \
                 it were edited and the chain recomputed, or the checkpoint was moved",
            ),
            Problem::CheckpointMalformed => f.write_str(
                "the checkpoint lacks a readable covers, head, every, key_id or sig",
            ),
            Problem::OtherKey { found, expected } => write!(
                f,
                "the checkpoint is signed by another key (key_id {found}, the given key is \
                 {expected})"
            ),
            Problem::BadSignature => f.write_str(
                "the checkpoint's signature does not verify: the checkpoint was forged or \
                 altered",
            ),
            Problem::CheckpointMissing { every, after_seq } => write!(
                f,
                "more than {every} lines follow the checkpoint at seq {after_seq} without a new \
                 one: a checkpoint was removed, or lines after it were rewritten"
            ),
            Problem::NoCheckpoint => f.write_str(
                "no signed checkpoint in the files: nothing here is vouched for by the key \
                 (checkpoints removed, or the log was written without a signing key)",
            ),
            Problem::TornInside => f.write_str(
                "the line has no newline and the file ends, yet later files follow: the file \
                 was cut",
            ),
        }
    }
}

/// The first broken line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The file it is in.
    pub file: PathBuf,
    /// Its line number in that file, from 1.
    pub line: u64,
    /// Its seq, when it has one.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
}

/// A last line without its newline, at the very end of the last file: a write cut short
/// (a crash), or a cut. It is not checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    /// The file.
    pub file: PathBuf,
    /// Its line number.
    pub line: u64,
    /// Its length in bytes.
    pub bytes: usize,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Lines checked and found intact (before the first broken one).
    pub lines: u64,
    /// The seq of the first line and of the last intact one.
    pub seq_range: Option<(u64, u64)>,
    /// Whether the first line continues a chain begun elsewhere (an older file, rotated
    /// away or not given), instead of starting at seq 0 from the genesis hash.
    pub starts_mid_chain: bool,
    /// Checkpoints whose signature verified with the key.
    pub checkpoints_verified: u64,
    /// Checkpoints seen (checked for their place in the chain only, without a key).
    pub checkpoints_seen: u64,
    /// Whether a key was given.
    pub with_key: bool,
    /// Lines after the last checkpoint (all of them when there is none): not signed.
    pub unsigned_tail: u64,
    /// A torn last line.
    pub torn: Option<Torn>,
    /// The first broken line, if any.
    pub broken: Option<Broken>,
}

impl Report {
    /// Whether no line was found broken.
    pub fn intact(&self) -> bool {
        self.broken.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(broken) = &self.broken {
            write!(
                f,
                "BROKEN at {} line {}{}: {}.",
                broken.file.display(),
                broken.line,
                broken.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
                broken.problem
            )?;
            write!(
                f,
                " The {} line{} before it {} intact.",
                self.lines,
                if self.lines == 1 { "" } else { "s" },
                if self.lines == 1 { "is" } else { "are" },
            )?;
            return Ok(());
        }
        write!(
            f,
            "intact: {} line{}",
            self.lines,
            if self.lines == 1 { "" } else { "s" }
        )?;
        if let Some((first, last)) = self.seq_range {
            write!(f, ", seq {first} to {last}")?;
        }
        if self.starts_mid_chain {
            f.write_str(" (starts mid-chain: earlier lines are in older files)")?;
        }
        if self.with_key {
            write!(
                f,
                "; {} checkpoint{} verified",
                self.checkpoints_verified,
                if self.checkpoints_verified == 1 { "" } else { "s" }
            )?;
        } else {
            write!(
                f,
                "; {} checkpoint{} not verified (no --key given)",
                self.checkpoints_seen,
                if self.checkpoints_seen == 1 { "" } else { "s" }
            )?;
        }
        if self.unsigned_tail > 0 {
            write!(
                f,
                "; the last {} line{} after the last checkpoint {} not signed (a cut there is \
                 only seen against a copy kept elsewhere)",
                self.unsigned_tail,
                if self.unsigned_tail == 1 { "" } else { "s" },
                if self.unsigned_tail == 1 { "is" } else { "are" },
            )?;
        }
        f.write_str(".")?;
        if let Some(torn) = &self.torn {
            write!(
                f,
                " The last line ({} line {}, {} bytes) has no newline: a write cut short, not \
                 checked.",
                torn.file.display(),
                torn.line,
                torn.bytes
            )?;
        }
        Ok(())
    }
}

/// The walk over the lines, carried across files.
struct Walk<'k> {
    key: Option<&'k PublicKey>,
    report: Report,
    /// The previous line's seq and hash.
    last: Option<(u64, [u8; 32])>,
    /// The last checkpoint's seq and every, and the lines since it.
    checkpoint: Option<(u64, u64)>,
    since: u64,
}

/// A line's problem, with its seq when it has one.
type LineResult = Result<(), (Option<u64>, Problem)>;

impl Walk<'_> {
    fn line(&mut self, bytes: &[u8]) -> LineResult {
        let value: serde_json::Value = std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| serde_json::from_str(text).ok())
            .filter(serde_json::Value::is_object)
            .ok_or((None, Problem::NotJson))?;
        let seq = value
            .get("seq")
            .and_then(serde_json::Value::as_u64)
            .ok_or((None, Problem::NoSeq))?;
        let fail = |problem| Err((Some(seq), problem));
        let Some(prev) = value
            .get("prev")
            .and_then(serde_json::Value::as_str)
            .and_then(parse_hash)
        else {
            return fail(Problem::NoPrev);
        };
        match self.last {
            None => {
                if (seq == 0) != (prev == GENESIS) {
                    return fail(Problem::BadGenesis);
                }
                self.report.starts_mid_chain = seq != 0;
            }
            Some((last_seq, last_hash)) => {
                let expected = last_seq.saturating_add(1);
                if seq > expected {
                    return fail(Problem::SeqJump {
                        expected,
                        found: seq,
                    });
                }
                if seq < expected {
                    return fail(Problem::SeqBack {
                        expected,
                        found: seq,
                    });
                }
                if prev != last_hash {
                    return fail(Problem::PrevMismatch);
                }
            }
        }
        let is_checkpoint =
            value.get("type").and_then(serde_json::Value::as_str) == Some(CHECKPOINT_TYPE);
        if is_checkpoint {
            self.checkpoint_line(&value, seq, &prev)
                .map_err(|problem| (Some(seq), problem))?;
        } else {
            self.since = self.since.saturating_add(1);
            if let (Some(_), Some((after_seq, every))) = (self.key, self.checkpoint) {
                if self.since > every {
                    return fail(Problem::CheckpointMissing { every, after_seq });
                }
            }
        }
        self.last = Some((seq, sha256(bytes)));
        self.report.lines += 1;
        let first = self.report.seq_range.map_or(seq, |(first, _)| first);
        self.report.seq_range = Some((first, seq));
        Ok(())
    }

    fn checkpoint_line(
        &mut self,
        value: &serde_json::Value,
        seq: u64,
        prev: &[u8; 32],
    ) -> Result<(), Problem> {
        let field = |name: &str| value.get(name).ok_or(Problem::CheckpointMalformed);
        let covers = field("covers")?
            .as_u64()
            .ok_or(Problem::CheckpointMalformed)?;
        let head = field("head")?
            .as_str()
            .and_then(parse_hash)
            .ok_or(Problem::CheckpointMalformed)?;
        let every = field("every")?
            .as_u64()
            .filter(|e| *e > 0)
            .ok_or(Problem::CheckpointMalformed)?;
        let found_key = field("key_id")?
            .as_str()
            .ok_or(Problem::CheckpointMalformed)?;
        let sig = field("sig")?
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or(Problem::CheckpointMalformed)?;
        // SECURITY: the signature is over covers and head; they must be this line's place in
        // the chain, or a valid checkpoint could be replayed beside other lines.
        if covers.checked_add(1) != Some(seq) || head != *prev {
            return Err(Problem::CheckpointMismatch);
        }
        if let Some(key) = self.key {
            let expected = key.key_id();
            if found_key != expected {
                return Err(Problem::OtherKey {
                    found: found_key.to_string(),
                    expected,
                });
            }
            if !signature_verifies(&key.raw, &checkpoint_message(covers, &head, every), &sig) {
                return Err(Problem::BadSignature);
            }
            self.report.checkpoints_verified += 1;
        }
        self.report.checkpoints_seen += 1;
        self.checkpoint = Some((seq, every));
        self.since = 0;
        Ok(())
    }
}

/// 64 lower-case hex digits as 32 bytes.
fn parse_hash(text: &str) -> Option<[u8; 32]> {
    // `from_str_radix` alone would take a sign ("+f"): one text, one hash.
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What [`read_line`] read.
enum LineRead {
    /// The end of the file.
    End,
    /// A line (in the buffer, without its newline), and whether it ended with one.
    Line { newline: bool },
    /// A line longer than [`MAX_LINE_BYTES`]; the buffer holds its start only.
    TooLong,
}

/// Reads one line of at most [`MAX_LINE_BYTES`] into `buf`, never more than that (and
/// the newline, and one byte to tell a longer line) into memory.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<LineRead> {
    buf.clear();
    // One byte over the cap (plus the newline) tells a line at the cap from a longer one.
    let read = reader
        .take(MAX_LINE_BYTES as u64 + 2)
        .read_until(b'\n', buf)?;
    if read == 0 {
        return Ok(LineRead::End);
    }
    let newline = buf.last() == Some(&b'\n');
    if newline {
        buf.pop();
    }
    if buf.len() > MAX_LINE_BYTES {
        return Ok(LineRead::TooLong);
    }
    Ok(LineRead::Line { newline })
}

/// Checks `files`, oldest first (`audit.log.2 audit.log.1 audit.log`, as built-in rotation
/// names them), as one chain; with `key`, every checkpoint's signature too. Stops at the
/// first broken line. An error is returned only when a file cannot be read.
pub fn verify(files: &[PathBuf], key: Option<&PublicKey>) -> Result<Report, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError::NoFiles);
    }
    let mut walk = Walk {
        key,
        report: Report {
            with_key: key.is_some(),
            ..Report::default()
        },
        last: None,
        checkpoint: None,
        since: 0,
    };
    let mut buf = Vec::new();
    let mut last_place = None;
    for (index, path) in files.iter().enumerate() {
        let io = |source| VerifyError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut reader = BufReader::new(file);
        let mut number = 0u64;
        let last_file = index + 1 == files.len();
        loop {
            let read = read_line(&mut reader, &mut buf).map_err(io)?;
            number += 1;
            let broken = |seq, problem| Broken {
                file: path.clone(),
                line: number,
                seq,
                problem,
            };
            match read {
                LineRead::End => break,
                LineRead::TooLong => {
                    walk.report.broken = Some(broken(None, Problem::TooLong));
                    return Ok(walk.finish());
                }
                LineRead::Line { newline: false } if last_file => {
                    walk.report.torn = Some(Torn {
                        file: path.clone(),
                        line: number,
                        bytes: buf.len(),
                    });
                    break;
                }
                LineRead::Line { newline: false } => {
                    walk.report.broken = Some(broken(None, Problem::TornInside));
                    return Ok(walk.finish());
                }
                LineRead::Line { newline: true } => {
                    if let Err((seq, problem)) = walk.line(&buf) {
                        walk.report.broken = Some(broken(seq, problem));
                        return Ok(walk.finish());
                    }
                    last_place = Some((path.clone(), number));
                }
            }
        }
    }
    if key.is_some() && walk.report.checkpoints_verified == 0 {
        if let Some((file, line)) = last_place {
            walk.report.broken = Some(Broken {
                file,
                line,
                seq: walk.last.map(|(seq, _)| seq),
                problem: Problem::NoCheckpoint,
            });
        }
    }
    Ok(walk.finish())
}

impl Walk<'_> {
    fn finish(mut self) -> Report {
        self.report.unsigned_tail = self.since;
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::tests::{test_key, test_signer};
    use super::super::chain::{Chain, Signer};
    use super::super::chain::{GENESIS, hex, sha256};
    use super::*;
    use std::time::Duration;

    const EVERY: u64 = 4;

    /// A case's outcome: `None` when intact, else the broken line's number, seq and problem.
    type Expected = Option<(u64, Option<u64>, Problem)>;

    /// `n` decision lines sealed into a chain, with checkpoints when `signer` is given.
    fn sealed(n: usize, signer: Option<Signer>) -> Vec<String> {
        let mut chain = Chain::resume(None, signer, EVERY, Duration::from_secs(3600));
        let mut out = Vec::new();
        for i in 0..n {
            chain.seal(
                &format!(r#"{{"decision":"allow","decision_id":"d{i}"}}"#),
                &mut out,
            );
        }
        chain.checkpoint(&mut out);
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Re-seals `lines` (their bodies without seq and prev) as an attacker without the key
    /// would: a fresh chain, continuing from `from`'s seq and prev, checkpoints kept as
    /// they are (their head and sig unchanged).
    fn rechain(lines: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        let mut chain = Chain::resume(None, None, EVERY, Duration::from_secs(3600));
        for line in lines {
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            let object = value.as_object_mut().unwrap();
            object.remove("seq");
            object.remove("prev");
            chain.seal(&value.to_string(), &mut out);
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn check(lines: &[String], key: Option<&PublicKey>) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        verify(&[path], key).unwrap()
    }

    fn index_of_type(lines: &[String], nth: usize) -> usize {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(r#""type":"checkpoint""#))
            .nth(nth)
            .unwrap()
            .0
    }

    #[test]
    fn tampering_is_found_at_the_first_broken_line() {
        let (signer, public) = test_signer();
        let key = PublicKey::from_raw(public);
        let (_, other) = test_signer();
        let other = PublicKey::from_raw(other);
        let good = sealed(10, Some(signer));
        // 10 decisions, a checkpoint after each 4, one at the end: 13 lines.
        assert_eq!(good.len(), 13);
        let cp0 = index_of_type(&good, 0);
        assert_eq!(cp0, 4);

        let edited = {
            let mut l = good.clone();
            l[2] = l[2].replace("allow", "deny!");
            l
        };
        let removed = {
            let mut l = good.clone();
            l.remove(2);
            l
        };
        let swapped = {
            let mut l = good.clone();
            l.swap(2, 3);
            l
        };
        let duplicated = {
            let mut l = good.clone();
            l.insert(3, l[2].clone());
            l
        };
        let checkpoint_removed = {
            let mut l = good.clone();
            l.remove(cp0);
            l
        };
        // An attacker without the key edits line 2 and recomputes the whole chain: the
        // chain is whole again, only the checkpoint catches it.
        let rechained = {
            let mut l = good.clone();
            l[2] = l[2].replace("allow", "deny!");
            rechain(&l)
        };
        // ... and also drops every checkpoint, leaving nothing signed.
        let rechained_unsigned = {
            let l: Vec<String> = good
                .iter()
                .filter(|l| !l.contains("checkpoint"))
                .map(|l| l.replace("d2", "dX"))
                .collect();
            rechain(&l)
        };
        // ... or drops the checkpoints after its edit (the first stays), leaving more than
        // `every` lines after the last one.
        let rechained_long_tail = {
            let cp1 = index_of_type(&good, 1);
            let mut l: Vec<String> = good.clone();
            l[cp1 - 1] = l[cp1 - 1].replace("allow", "deny!");
            l.retain(|line| !line.contains("checkpoint") || *line == good[cp0]);
            rechain(&l)
        };
        // The last checkpoint's signature altered (nothing follows it to break).
        let forged = {
            let mut l = good.clone();
            let last = l.len() - 1;
            let mut value: serde_json::Value = serde_json::from_str(&l[last]).unwrap();
            let sig = value["sig"].as_str().unwrap().to_string();
            let flipped = if sig.starts_with('A') { "B" } else { "A" };
            value["sig"] = format!("{flipped}{}", &sig[1..]).into();
            l[last] = value.to_string();
            l
        };
        let checkpoint_moved = {
            // The first checkpoint's line replayed further on, the chain recomputed.
            let mut l = good.clone();
            let checkpoint = l.remove(cp0);
            l.insert(cp0 + 1, checkpoint);
            rechain(&l)
        };
        let not_json = {
            let mut l = good.clone();
            l[5] = "not json".into();
            l
        };
        let no_seq = {
            let mut l = good.clone();
            l[5] = r#"{"decision":"allow"}"#.into();
            l
        };
        let bad_prev = {
            let mut l = good.clone();
            let mut value: serde_json::Value = serde_json::from_str(&l[5]).unwrap();
            value["prev"] = "zz".into();
            l[5] = value.to_string();
            l
        };
        let genesis_mid = {
            // Cut at the start, and the genesis hash claimed by a later line.
            let mut l = good[3..].to_vec();
            let mut value: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
            value["prev"] = hex(&GENESIS).into();
            l[0] = value.to_string();
            l
        };

        let genesis_lost = {
            // The first line's prev replaced: seq 0 must come from the genesis hash.
            let mut l = good.clone();
            let mut value: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
            value["prev"] = hex(&sha256(b"elsewhere")).into();
            l[0] = value.to_string();
            l
        };
        let unsigned_checkpoint = {
            let mut l = good.clone();
            let last = l.len() - 1;
            let mut value: serde_json::Value = serde_json::from_str(&l[last]).unwrap();
            value.as_object_mut().unwrap().remove("sig");
            l[last] = value.to_string();
            l
        };
        let covers_changed = {
            let mut l = good.clone();
            let last = l.len() - 1;
            let mut value: serde_json::Value = serde_json::from_str(&l[last]).unwrap();
            value["covers"] = 99.into();
            l[last] = value.to_string();
            l
        };
        let jump = |expected, found| Problem::SeqJump { expected, found };
        let back = |expected, found| Problem::SeqBack { expected, found };
        // (name, lines, key, expected: None = intact, or (line number, seq, problem)).
        let cases: Vec<(&str, &[String], Option<&PublicKey>, Expected)> = vec![
            ("intact, key", &good, Some(&key), None),
            ("intact, no key", &good, None, None),
            ("edited", &edited, None, Some((4, Some(3), Problem::PrevMismatch))),
            ("removed", &removed, None, Some((3, Some(3), jump(2, 3)))),
            ("swapped", &swapped, None, Some((3, Some(3), jump(2, 3)))),
            ("duplicated", &duplicated, None, Some((4, Some(2), back(3, 2)))),
            ("checkpoint removed", &checkpoint_removed, None, Some((5, Some(5), jump(4, 5)))),
            ("rechained", &rechained, None, Some((5, Some(4), Problem::CheckpointMismatch))),
            ("rechained unsigned, key", &rechained_unsigned, Some(&key), Some((10, Some(9), Problem::NoCheckpoint))),
            ("rechained long tail, key", &rechained_long_tail, Some(&key), Some((10, Some(9), Problem::CheckpointMissing { every: EVERY, after_seq: 4 }))),
            ("forged signature, key", &forged, Some(&key), Some((13, Some(12), Problem::BadSignature))),
            ("forged signature, no key", &forged, None, None),
            ("other key", &good, Some(&other), Some((5, Some(4), Problem::OtherKey { found: key.key_id(), expected: other.key_id() }))),
            ("checkpoint moved", &checkpoint_moved, None, Some((6, Some(5), Problem::CheckpointMismatch))),
            ("not json", &not_json, None, Some((6, None, Problem::NotJson))),
            ("no seq", &no_seq, None, Some((6, None, Problem::NoSeq))),
            ("bad prev", &bad_prev, None, Some((6, Some(5), Problem::NoPrev))),
            ("genesis lost", &genesis_lost, None, Some((1, Some(0), Problem::BadGenesis))),
            ("covers changed", &covers_changed, None, Some((13, Some(12), Problem::CheckpointMismatch))),
            ("checkpoint without sig", &unsigned_checkpoint, None, Some((13, Some(12), Problem::CheckpointMalformed))),
            ("genesis mid-chain", &genesis_mid, None, Some((1, Some(3), Problem::BadGenesis))),
        ];
        for (name, lines, key, expected) in cases {
            let report = check(lines, key);
            let found = report
                .broken
                .as_ref()
                .map(|b| (b.line, b.seq, b.problem.clone()));
            assert_eq!(found, expected, "{name}: {report}");
        }
    }

    #[test]
    fn an_intact_report_counts_lines_checkpoints_and_the_unsigned_tail() {
        let (signer, public) = test_signer();
        let key = PublicKey::from_raw(public);
        let mut lines = sealed(10, Some(signer));
        lines.pop(); // the final checkpoint: lines 8 and 9 are now unsigned
        let report = check(&lines, Some(&key));
        assert!(report.intact(), "{report}");
        assert_eq!(report.lines, 12);
        assert_eq!(report.seq_range, Some((0, 11)));
        assert_eq!(report.checkpoints_verified, 2);
        assert_eq!(report.unsigned_tail, 2);
        assert!(!report.starts_mid_chain);
        let text = report.to_string();
        assert!(text.starts_with("intact: 12 lines, seq 0 to 11; 2 checkpoints verified; the last 2 lines"), "{text}");
    }

    #[test]
    fn a_chain_resumed_after_a_restart_verifies_with_its_checkpoints() {
        // (lines before the restart, every before, every after): a crash after a line (no
        // checkpoint last), a clean stop (a checkpoint last), `every` raised and lowered.
        let cases = [(7, 4, 4), (8, 4, 4), (8, 4, 8), (7, 4, 2)];
        for (before, every_before, every_after) in cases {
            let (der, public) = test_key();
            let key = PublicKey::from_raw(public);
            let signer = Signer::from_pkcs8(&der).unwrap();
            let mut chain = Chain::resume(None, Some(signer), every_before, Duration::MAX);
            let mut out = Vec::new();
            for _ in 0..before {
                chain.seal(r#"{"decision":"allow"}"#, &mut out);
            }
            let text = String::from_utf8(out.clone()).unwrap();
            let last = text.lines().last().unwrap();
            let again = Signer::from_pkcs8(&der).unwrap();
            let mut chain = Chain::resume(Some(last), Some(again), every_after, Duration::MAX);
            for _ in 0..9 {
                chain.seal(r#"{"decision":"deny"}"#, &mut out);
            }
            let lines: Vec<String> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            let report = check(&lines, Some(&key));
            assert!(
                report.intact(),
                "{before} lines, every {every_before} then {every_after}: {report}"
            );
        }
    }

    #[test]
    fn a_file_cut_at_the_start_is_a_mid_chain_start_not_an_error() {
        let (signer, public) = test_signer();
        let key = PublicKey::from_raw(public);
        let lines = sealed(10, Some(signer));
        let report = check(&lines[3..], Some(&key));
        assert!(report.intact(), "{report}");
        assert!(report.starts_mid_chain);
        assert_eq!(report.seq_range, Some((3, 12)));
        assert!(report.to_string().contains("starts mid-chain"));
    }

    #[test]
    fn rotated_files_are_one_chain_in_order() {
        let (signer, public) = test_signer();
        let key = PublicKey::from_raw(public);
        let lines = sealed(10, Some(signer));
        let dir = tempfile::tempdir().unwrap();
        let parts = [(&lines[..5], "audit.log.1"), (&lines[5..], "audit.log")];
        let mut paths = Vec::new();
        for (part, name) in parts {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{}\n", part.join("\n"))).unwrap();
            paths.push(path);
        }
        let report = verify(&paths, Some(&key)).unwrap();
        assert!(report.intact(), "{report}");
        assert_eq!(report.lines, 13);
        paths.reverse();
        let report = verify(&paths, Some(&key)).unwrap();
        let broken = report.broken.unwrap();
        assert_eq!(broken.file, dir.path().join("audit.log.1"));
        assert_eq!(broken.line, 1);
        assert_eq!(broken.problem, Problem::SeqBack { expected: 13, found: 0 });
    }

    #[test]
    fn torn_and_overlong_lines() {
        let lines = sealed(3, None);
        let dir = tempfile::tempdir().unwrap();
        let torn = dir.path().join("torn.log");
        let whole = format!("{}\n", lines.join("\n"));
        std::fs::write(&torn, format!("{whole}{{\"decision\":\"al")).unwrap();
        let report = verify(std::slice::from_ref(&torn), None).unwrap();
        assert!(report.intact(), "{report}");
        assert_eq!(
            report.torn,
            Some(Torn {
                file: torn.clone(),
                line: 4,
                bytes: 15
            })
        );
        assert!(report.to_string().contains("has no newline"));

        // A torn line in a file that is not the last is a cut.
        let next = dir.path().join("next.log");
        std::fs::write(&next, &whole).unwrap();
        let report = verify(&[torn, next], None).unwrap();
        assert_eq!(report.broken.unwrap().problem, Problem::TornInside);

        // Lines at the cap are read; one byte more is an error, not an allocation.
        let long = dir.path().join("long.log");
        let mut text = whole.clone();
        text.push_str(&"x".repeat(MAX_LINE_BYTES));
        text.push('\n');
        std::fs::write(&long, &text).unwrap();
        let report = verify(std::slice::from_ref(&long), None).unwrap();
        assert_eq!(report.broken.unwrap().problem, Problem::NotJson);
        let mut text = whole;
        text.push_str(&"x".repeat(MAX_LINE_BYTES + 1));
        text.push('\n');
        std::fs::write(&long, &text).unwrap();
        let report = verify(&[long], None).unwrap();
        let broken = report.broken.unwrap();
        assert_eq!((broken.line, broken.problem), (4, Problem::TooLong));
    }

    #[test]
    fn parse_hash_takes_only_64_lower_case_hex_digits() {
        let good = hex(&sha256(b"x"));
        let cases = [
            (good.clone(), true),
            (good.to_uppercase(), false),
            (good[..62].to_string(), false),
            (format!("{good}00"), false),
            (format!("+{}", &good[1..]), false),
            (format!("é{}", &good[2..]), false),
        ];
        for (text, ok) in cases {
            assert_eq!(parse_hash(&text).is_some(), ok, "{text}");
        }
    }

    #[test]
    fn public_keys_load_from_spki_pem_only() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = super::super::chain::generate_key().unwrap();
        let cases = [
            ("public.pem", public, None),
            ("private.pem", private, Some("no public key (a \"-----BEGIN PUBLIC KEY-----\" PEM block) in it; it holds a private key")),
            (
                "p256.pem",
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .unwrap()
                    .public_key_pem(),
                Some("not an ed25519 public key"),
            ),
        ];
        for (name, content, error) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            match (PublicKey::load(&path), error) {
                (Ok(_), None) => {}
                (Err(e), Some(expected)) => {
                    let e = e.to_string();
                    assert!(e.contains(expected) && e.contains(name), "{e}");
                }
                (other, _) => panic!("{name}: {other:?}"),
            }
        }
    }
}
