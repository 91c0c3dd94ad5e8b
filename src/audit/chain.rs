//! The audit hash chain: each line carries `seq` (its number) and `prev` (the SHA-256 of
//! the line before it, as written), so a cut, an edit or a reordering breaks the chain; with
//! a signing key, a signed checkpoint line every so often vouches for the chain up to it.
//! Goes in: a line's JSON object (and the Ed25519 key); comes out: the sealed lines.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// The `prev` of the first line of a new chain.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// What a checkpoint's signed message starts with, so that the signature can never be
/// taken for one over anything else this key might sign.
pub(crate) const CHECKPOINT_DOMAIN: &str = "portcullis-audit-checkpoint-v1\n";

/// The `type` of a checkpoint line.
pub(crate) const CHECKPOINT_TYPE: &str = "checkpoint";

/// The largest PEM file read as a signing or public key: an Ed25519 key is ~120 bytes.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Where a chain stands: the next line's number, the hash of the last line, how many lines
/// were sealed since the last checkpoint and when that checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) seq: u64,
    pub(crate) prev: [u8; 32],
    since: u64,
    checkpointed_at: Instant,
}

/// An Ed25519 private key that signs checkpoints. Its `Debug` shows the key id only.
pub(crate) struct Signer {
    key: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.key_id)
    }
}

/// Seals lines into the chain, in order; one per audit writer.
#[derive(Debug)]
pub(crate) struct Chain {
    at: Mark,
    signer: Option<Signer>,
    every: u64,
    interval: Duration,
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(bytes, &mut out);
    out
}

/// Appends `bytes` in lower-case hex (once per audit line: no formatter).
fn push_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// The SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// A public key's id in checkpoints: the first 16 hex digits of the SHA-256 of its 32 raw
/// bytes.
pub(crate) fn key_id(public_key: &[u8]) -> String {
    let mut id = hex(&sha256(public_key));
    id.truncate(16);
    id
}

/// The exact bytes a checkpoint's signature is over: the domain line, then the seq of the
/// last line it covers, that line's SHA-256 in lower-case hex, and the checkpoint interval
/// in lines, each on a line of its own:
/// `portcullis-audit-checkpoint-v1\n{covers}\n{head}\n{every}\n`.
pub(crate) fn checkpoint_message(covers: u64, head: &[u8; 32], every: u64) -> Vec<u8> {
    format!("{CHECKPOINT_DOMAIN}{covers}\n{}\n{every}\n", hex(head)).into_bytes()
}

/// `der` as a PEM block labelled `label`, lines of 64 characters.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The SubjectPublicKeyInfo PEM (`PUBLIC KEY`) of a raw Ed25519 public key.
pub(crate) fn public_key_pem(raw: &[u8]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(raw);
    pem("PUBLIC KEY", &der)
}

/// The raw 32 bytes of an Ed25519 SubjectPublicKeyInfo, or `None` when it is not one.
pub(crate) fn ed25519_from_spki(der: &[u8]) -> Option<[u8; 32]> {
    let raw = der.strip_prefix(&ED25519_SPKI_PREFIX)?;
    raw.try_into().ok()
}

/// Reads a PEM key file, capped, naming the file in every error.
pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>, String> {
    crate::files::read_capped(path, MAX_KEY_FILE).map_err(|e| e.to_string())
}

/// A fresh Ed25519 private key as PKCS#8 (v2) PEM, and its public key as SPKI PEM.
pub(crate) fn generate_key() -> Result<(String, String), String> {
    let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| "cannot generate an ed25519 key".to_string())?;
    let signer = Signer::from_pkcs8(document.as_ref())
        .map_err(|e| format!("the generated key does not load: {e}"))?;
    Ok((
        pem("PRIVATE KEY", document.as_ref()),
        public_key_pem(&signer.public_key()),
    ))
}

impl Signer {
    /// Loads an Ed25519 private key from a PKCS#8 PEM file (v1 as openssl and rcgen write
    /// it, or v2). Errors name the file and what is wrong, never the key's bytes.
    pub(crate) fn load(path: &Path) -> Result<Signer, String> {
        let bytes = read_key_file(path)?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&bytes).map_err(|_| {
            format!(
                "{}: no PKCS#8 private key (a PEM block labelled \"PRIVATE KEY\", as `portcullis audit keygen` and `openssl genpkey` write) in it",
                path.display()
            )
        })?;
        Signer::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key from PKCS#8 DER (v1 or v2).
    pub(crate) fn from_pkcs8(der: &[u8]) -> Result<Signer, String> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| {
            format!("not an ed25519 private key in PKCS#8 ({e}); make one with `portcullis audit keygen`")
        })?;
        let key_id = key_id(key.public_key().as_ref());
        Ok(Signer { key, key_id })
    }

    /// The raw 32-byte public key.
    pub(crate) fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

/// Whether `signature` is `public_key`'s Ed25519 signature of `message`.
pub(crate) fn signature_verifies(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

impl Chain {
    /// A chain continuing after `last`, the last complete line of an existing file (its
    /// `seq` and hash), or a new chain when there is none or it carries no `seq`. With a
    /// `signer`, a checkpoint follows every `every` lines (0 is taken as 1).
    ///
    /// How many lines follow the last checkpoint in the file is not known from its last
    /// line, so unless that line is a checkpoint made with this same `every`, a checkpoint
    /// is written before the first new line: a verifier counts at most `every` lines after
    /// each checkpoint.
    pub(crate) fn resume(
        last: Option<&str>,
        signer: Option<Signer>,
        every: u64,
        interval: Duration,
    ) -> Chain {
        let every = every.max(1);
        let resumed = last.and_then(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            let seq = value.get("seq")?.as_u64()?;
            let checkpointed = value.get("type").and_then(|t| t.as_str()) == Some(CHECKPOINT_TYPE)
                && value.get("every").and_then(|e| e.as_u64()) == Some(every);
            Some((seq, sha256(line.as_bytes()), checkpointed))
        });
        let at = match resumed {
            Some((seq, prev, checkpointed)) => Mark {
                seq: seq.saturating_add(1),
                prev,
                since: if checkpointed { 0 } else { every },
                checkpointed_at: Instant::now(),
            },
            None => Mark {
                seq: 0,
                prev: GENESIS,
                since: 0,
                checkpointed_at: Instant::now(),
            },
        };
        Chain {
            at,
            signer,
            every,
            interval,
        }
    }

    /// Appends `body` (one JSON object, without a newline) to `out`, sealed with `seq` and
    /// `prev`, and a newline; then, with a signer, a checkpoint line when `every` lines have
    /// been sealed since the last one.
    pub(crate) fn seal(&mut self, body: &str, out: &mut Vec<u8>) {
        // Only after `resume`: the lines since the file's last checkpoint are unknown.
        if self.at.since >= self.every {
            self.checkpoint(out);
        }
        self.seal_line(body, out);
        self.at.since = self.at.since.saturating_add(1);
        if self.at.since >= self.every {
            self.checkpoint(out);
        }
    }

    fn seal_line(&mut self, body: &str, out: &mut Vec<u8>) {
        let start = out.len();
        let open = body.trim_end().strip_suffix('}').unwrap_or(body);
        out.extend_from_slice(open.as_bytes());
        if open.trim_end() != "{" {
            out.push(b',');
        }
        let mut tail = String::with_capacity(100);
        tail.push_str("\"seq\":");
        tail.push_str(&self.at.seq.to_string());
        tail.push_str(",\"prev\":\"");
        push_hex(&self.at.prev, &mut tail);
        tail.push_str("\"}");
        out.extend_from_slice(tail.as_bytes());
        self.at.seq = self.at.seq.saturating_add(1);
        self.at.prev = sha256(&out[start..]);
        out.push(b'\n');
    }

    /// Whether a checkpoint is due at `now`: there is a signer, lines were sealed since the
    /// last checkpoint, and `interval` has passed since it.
    pub(crate) fn checkpoint_due(&self, now: Instant) -> bool {
        self.signer.is_some()
            && self.at.since > 0
            && now.saturating_duration_since(self.at.checkpointed_at) >= self.interval
    }

    /// Appends a checkpoint line when there is a signer and lines were sealed since the last
    /// one: the writer calls it when due, before a rotation and at shutdown.
    pub(crate) fn checkpoint(&mut self, out: &mut Vec<u8>) {
        let Some(signer) = &self.signer else {
            return;
        };
        if self.at.since == 0 {
            return;
        }
        // The line it covers is the one just sealed: the checkpoint's own `prev`.
        let covers = self.at.seq.saturating_sub(1);
        let head = self.at.prev;
        let signature = signer
            .key
            .sign(&checkpoint_message(covers, &head, self.every));
        let body = serde_json::json!({
            "type": CHECKPOINT_TYPE,
            "time": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "covers": covers,
            "head": hex(&head),
            "every": self.every,
            "key_id": signer.key_id,
            "sig": base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        })
        .to_string();
        self.seal_line(&body, out);
        self.at.since = 0;
        self.at.checkpointed_at = Instant::now();
    }

    /// Where the chain stands, to [`Chain::rewind`] to when a batch is not written.
    pub(crate) fn mark(&self) -> Mark {
        self.at
    }

    /// Back to `mark`: the lines (and checkpoints) sealed since were never written.
    pub(crate) fn rewind(&mut self, mark: Mark) {
        self.at = mark;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh signer (and its raw public key) for tests.
    pub(crate) fn test_signer() -> (Signer, [u8; 32]) {
        let (der, public) = test_key();
        (Signer::from_pkcs8(&der).unwrap(), public)
    }

    /// A fresh key as PKCS#8 DER (to load more than once), and its raw public key.
    pub(crate) fn test_key() -> (Vec<u8>, [u8; 32]) {
        let (private, _) = generate_key().unwrap();
        let der = PrivatePkcs8KeyDer::from_pem_slice(private.as_bytes()).unwrap();
        let der = der.secret_pkcs8_der().to_vec();
        let public = Signer::from_pkcs8(&der).unwrap().public_key();
        (der, public.try_into().unwrap())
    }

    fn lines(out: &[u8]) -> Vec<String> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn json(line: &str) -> serde_json::Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn lines_are_numbered_and_linked() {
        let mut chain = Chain::resume(None, None, 1000, Duration::from_secs(60));
        let mut out = Vec::new();
        chain.seal(r#"{"a":1}"#, &mut out);
        chain.seal("{}", &mut out);
        let lines = lines(&out);
        assert_eq!(
            lines[0],
            format!(r#"{{"a":1,"seq":0,"prev":"{}"}}"#, hex(&GENESIS))
        );
        assert_eq!(
            lines[1],
            format!(
                r#"{{"seq":1,"prev":"{}"}}"#,
                hex(&sha256(lines[0].as_bytes()))
            )
        );
        let resumed = Chain::resume(Some(&lines[1]), None, 1000, Duration::from_secs(60));
        assert_eq!(resumed.mark().seq, 2);
        assert_eq!(resumed.mark().prev, sha256(lines[1].as_bytes()));
    }

    #[test]
    fn a_checkpoint_follows_every_nth_line_and_its_signature_verifies() {
        let (signer, public) = test_signer();
        let mut chain = Chain::resume(None, Some(signer), 2, Duration::from_secs(3600));
        let mut out = Vec::new();
        for _ in 0..5 {
            chain.seal(r#"{"decision":"allow"}"#, &mut out);
        }
        let lines = lines(&out);
        let types: Vec<Option<String>> = lines
            .iter()
            .map(|l| json(l).get("type").and_then(|t| t.as_str()).map(String::from))
            .collect();
        let cp = Some("checkpoint".to_string());
        assert_eq!(types, [None, None, cp.clone(), None, None, cp, None]);
        let checkpoint = json(&lines[2]);
        assert_eq!(checkpoint["covers"], 1);
        assert_eq!(checkpoint["seq"], 2);
        assert_eq!(checkpoint["every"], 2);
        assert_eq!(checkpoint["head"], hex(&sha256(lines[1].as_bytes())));
        assert_eq!(checkpoint["prev"], checkpoint["head"]);
        assert_eq!(checkpoint["key_id"], key_id(&public));
        let sig = base64::engine::general_purpose::STANDARD
            .decode(checkpoint["sig"].as_str().unwrap())
            .unwrap();
        let head = sha256(lines[1].as_bytes());
        assert!(signature_verifies(
            &public,
            &checkpoint_message(1, &head, 2),
            &sig
        ));
        // The domain separation and every field are signed.
        for message in [
            checkpoint_message(2, &head, 2),
            checkpoint_message(1, &GENESIS, 2),
            checkpoint_message(1, &head, 3),
            checkpoint_message(1, &head, 2)[CHECKPOINT_DOMAIN.len()..].to_vec(),
        ] {
            assert!(!signature_verifies(&public, &message, &sig));
        }
    }

    #[test]
    fn checkpoints_are_due_by_time_only_with_a_signer_and_new_lines() {
        let start = Instant::now();
        let later = start + Duration::from_secs(61);
        let (signer, _) = test_signer();
        let mut signed = Chain::resume(None, Some(signer), 1000, Duration::from_secs(60));
        let mut unsigned = Chain::resume(None, None, 1000, Duration::from_secs(60));
        let mut out = Vec::new();
        assert!(!signed.checkpoint_due(later), "no line sealed yet");
        signed.seal("{}", &mut out);
        unsigned.seal("{}", &mut out);
        assert!(!signed.checkpoint_due(start), "interval not elapsed");
        assert!(signed.checkpoint_due(later));
        assert!(!unsigned.checkpoint_due(later), "no signer");
        let before = out.len();
        unsigned.checkpoint(&mut out);
        assert_eq!(out.len(), before, "no signer, no checkpoint");
        signed.checkpoint(&mut out);
        assert!(out.len() > before);
        let before = out.len();
        signed.checkpoint(&mut out);
        assert_eq!(out.len(), before, "no line since the last checkpoint");
        assert!(!signed.checkpoint_due(later + Duration::from_secs(120)));
    }

    #[test]
    fn rewind_restores_seq_prev_and_the_checkpoint_count() {
        let (signer, _) = test_signer();
        let mut chain = Chain::resume(None, Some(signer), 3, Duration::from_secs(3600));
        let mut out = Vec::new();
        chain.seal("{}", &mut out);
        let mark = chain.mark();
        let mut lost = Vec::new();
        chain.seal("{}", &mut lost);
        chain.seal("{}", &mut lost); // and its checkpoint
        assert_eq!(lines(&lost).len(), 3);
        chain.rewind(mark);
        assert_eq!(chain.mark(), mark);
        let mut again = Vec::new();
        chain.seal("{}", &mut again);
        chain.seal("{}", &mut again);
        // Sealed identically, but for the checkpoint's time.
        let without_time = |out: &[u8]| -> Vec<serde_json::Value> {
            lines(out)
                .iter()
                .map(|l| {
                    let mut value = json(l);
                    value.as_object_mut().unwrap().remove("time");
                    value
                })
                .collect()
        };
        assert_eq!(without_time(&again), without_time(&lost));
    }

    #[test]
    fn resuming_checkpoints_first_unless_the_file_ends_with_a_checkpoint() {
        let (signer, _) = test_signer();
        let mut chain = Chain::resume(None, Some(signer), 3, Duration::from_secs(3600));
        let mut out = Vec::new();
        chain.seal("{}", &mut out);
        chain.seal("{}", &mut out);
        chain.seal("{}", &mut out);
        let written = lines(&out);
        let (decision, checkpoint) = (&written[2], &written[3]);
        // (last line, every) -> whether a checkpoint comes before the next line.
        let cases = [
            (decision.as_str(), 3, true),
            (checkpoint.as_str(), 3, false),
            (checkpoint.as_str(), 5, true),
        ];
        for (last, every, first) in cases {
            let (signer, _) = test_signer();
            let mut resumed =
                Chain::resume(Some(last), Some(signer), every, Duration::from_secs(3600));
            let mut out = Vec::new();
            resumed.seal(r#"{"n":1}"#, &mut out);
            let new = lines(&out);
            assert_eq!(
                json(&new[0]).get("type").is_some(),
                first,
                "{last} every {every}"
            );
            assert_eq!(json(&new[0])["prev"], hex(&sha256(last.as_bytes())));
        }
    }

    #[test]
    fn keys_load_from_pem_and_errors_name_the_file_without_key_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = generate_key().unwrap();
        let good = dir.path().join("good.pem");
        std::fs::write(&good, &private).unwrap();
        let signer = Signer::load(&good).unwrap();
        assert_eq!(public_key_pem(&signer.public_key()), public);
        // A PKCS#8 v1 key as openssl and rcgen write it.
        let v1 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let v1_path = dir.path().join("v1.pem");
        std::fs::write(&v1_path, v1.serialize_pem()).unwrap();
        let signer = Signer::load(&v1_path).unwrap();
        assert_eq!(signer.public_key(), v1.public_key_raw());

        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cases = [
            ("missing.pem", None, "cannot read"),
            ("empty.pem", Some(String::new()), "no PKCS#8 private key"),
            ("public.pem", Some(public), "no PKCS#8 private key"),
            ("p256.pem", Some(p256.serialize_pem()), "not an ed25519 private key"),
        ];
        for (name, content, expected) in cases {
            let path = dir.path().join(name);
            if let Some(content) = &content {
                std::fs::write(&path, content).unwrap();
            }
            let err = Signer::load(&path).unwrap_err();
            assert!(err.contains(name), "{err}");
            assert!(err.contains(expected), "{err}");
            assert!(!err.contains("MII"), "{err}");
        }
    }
}
