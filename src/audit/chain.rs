//! The audit hash chain: each line carries `seq` (its number) and `prev` (the SHA-256 of
//! the line before it, as written), so a cut, an edit or a reordering breaks the chain.
//! Goes in: a line's JSON object; comes out: the sealed line.

use aws_lc_rs::digest::{SHA256, digest};

/// The `prev` of the first line of a new chain.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// Where a chain stands: the next line's number and the hash of the last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) seq: u64,
    pub(crate) prev: [u8; 32],
}

/// Seals lines into the chain, in order; one per audit writer.
#[derive(Debug)]
pub(crate) struct Chain {
    at: Mark,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl Chain {
    /// A chain continuing after `last`, the last complete line of an existing file (its
    /// `seq` and hash), or a new chain when there is none or it carries no `seq`.
    pub(crate) fn resume(last: Option<&str>) -> Chain {
        let at = last
            .and_then(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                let seq = value.get("seq")?.as_u64()?;
                Some(Mark {
                    seq: seq + 1,
                    prev: sha256(line.as_bytes()),
                })
            })
            .unwrap_or(Mark {
                seq: 0,
                prev: GENESIS,
            });
        Chain { at }
    }

    /// Appends `body` (one JSON object, without a newline) to `out`, sealed with `seq` and
    /// `prev`, and a newline.
    pub(crate) fn seal(&mut self, body: &str, out: &mut Vec<u8>) {
        let start = out.len();
        let open = body.trim_end().strip_suffix('}').unwrap_or(body);
        out.extend_from_slice(open.as_bytes());
        if open.trim_end() != "{" {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                "\"seq\":{},\"prev\":\"{}\"}}",
                self.at.seq,
                hex(&self.at.prev)
            )
            .as_bytes(),
        );
        self.at = Mark {
            seq: self.at.seq + 1,
            prev: sha256(&out[start..]),
        };
        out.push(b'\n');
    }

    /// Where the chain stands, to [`Chain::rewind`] to when a batch is not written.
    pub(crate) fn mark(&self) -> Mark {
        self.at
    }

    /// Back to `mark`: the lines sealed since were never written.
    pub(crate) fn rewind(&mut self, mark: Mark) {
        self.at = mark;
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_linked() {
        let mut chain = Chain::resume(None);
        let mut out = Vec::new();
        chain.seal(r#"{"a":1}"#, &mut out);
        chain.seal("{}", &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
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
        let resumed = Chain::resume(Some(lines[1]));
        assert_eq!(resumed.mark().seq, 2);
        assert_eq!(resumed.mark().prev, sha256(lines[1].as_bytes()));
    }
}
