//! Reading operator files (configuration, policies, schema, entities, trust material, keys,
//! the revocation list, the listener's TLS files): a path in, its bytes out, only when the
//! path names a regular file no larger than a cap.
//!
//! SECURITY: every operator file is read through here. A FIFO, a socket or a device put in
//! a watched file's place must not hang start-up or a reload thread (the open is
//! non-blocking and the type is checked on the opened file, not on the path, so a swap
//! between the check and the read cannot slip through), and a huge file must not take the
//! server's memory (the read stops one byte past the cap).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The default cap on one operator file (`[limits] max_file_bytes`): 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

static MAX_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_BYTES);

/// Sets the cap [`read`] and [`read_to_string`] apply, for the whole process (the binary
/// sets it from `[limits] max_file_bytes` before loading anything else).
pub fn set_max_bytes(max: u64) {
    MAX_BYTES.store(max, Ordering::Relaxed);
}

/// The cap [`read`] and [`read_to_string`] apply now.
pub fn max_bytes() -> u64 {
    MAX_BYTES.load(Ordering::Relaxed)
}

/// Why an operator file could not be read; the message starts with the path.
#[derive(Debug)]
#[non_exhaustive]
pub enum FileError {
    /// Opening or reading failed (missing, permission denied, ...).
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The path names a FIFO, socket, device or directory.
    NotRegular { path: PathBuf, kind: &'static str },
    /// More bytes than the cap; `configured` when the cap is `[limits] max_file_bytes`.
    TooLarge {
        path: PathBuf,
        max: u64,
        configured: bool,
    },
    /// Not UTF-8 text, where text was expected.
    NotText { path: PathBuf },
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Io { path, source } => {
                write!(f, "{}: cannot read: {source}", path.display())
            }
            FileError::NotRegular { path, kind } => write!(
                f,
                "{}: not a regular file (it is {kind}); only regular files are read",
                path.display()
            ),
            FileError::TooLarge {
                path,
                max,
                configured,
            } => {
                write!(f, "{}: larger than {max} bytes", path.display())?;
                if *configured {
                    f.write_str(" (raise [limits] max_file_bytes if it must be)")?;
                }
                Ok(())
            }
            FileError::NotText { path } => write!(f, "{}: not UTF-8 text", path.display()),
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FileError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// The bytes of the regular file at `path`, at most [`max_bytes`] of them.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    read_capped(path, max_bytes()).map_err(|e| match e {
        FileError::TooLarge { path, max, .. } => FileError::TooLarge {
            path,
            max,
            configured: true,
        },
        other => other,
    })
}

/// The text of the regular file at `path`, at most [`max_bytes`] bytes of UTF-8.
pub fn read_to_string(path: &Path) -> Result<String, FileError> {
    String::from_utf8(read(path)?).map_err(|_| FileError::NotText {
        path: path.to_path_buf(),
    })
}

/// The bytes of the regular file at `path`, at most `max` of them.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (file, meta) = open_regular(path, std::fs::OpenOptions::new().read(true))?;
    let too_large = || FileError::TooLarge {
        path: path.to_path_buf(),
        max,
        configured: false,
    };
    if meta.len() > max {
        return Err(too_large());
    }
    // The size may change between fstat and read (a writer appending): read one byte past
    // the cap and refuse if it came.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Whether `path` can be appended to by [`open_append`], without opening or creating it:
/// a regular file, or nothing yet in a directory that exists. Why not, if not.
pub fn check_append(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(format!(
            "not a regular file (it is {})",
            kind_of(m.file_type())
        )),
        Ok(_) => Ok(()),
        Err(_) if path.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) => {
            Err("its directory does not exist".into())
        }
        Err(_) => Ok(()),
    }
}

/// The regular file at `path` opened to append (created, mode 0600, when missing) and to
/// read back, never blocking on a FIFO: the audit log.
pub fn open_append(path: &Path) -> Result<File, FileError> {
    // A new file is readable by its owner only.
    let (file, _) = open_regular(
        path,
        std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600),
    )?;
    Ok(file)
}

/// Opens `path` with `options`, and only if what was opened is a regular file.
///
/// SECURITY: O_NONBLOCK so that opening a FIFO with no writer (or no reader) returns at
/// once instead of waiting for one; the type is then checked on what was opened (fstat),
/// so a FIFO swapped in for the path after a check cannot slip through.
fn open_regular(
    path: &Path,
    options: &mut std::fs::OpenOptions,
) -> Result<(File, std::fs::Metadata), FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = options
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok((file, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("run mkfifo");
        assert!(status.success(), "mkfifo failed");
    }

    #[test]
    fn reads_a_regular_file_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "hello\n").unwrap();
        assert_eq!(read_capped(&p, 6).unwrap(), b"hello\n");
        assert_eq!(read_to_string(&p).unwrap(), "hello\n");
    }

    #[test]
    fn refuses_what_is_not_a_regular_file_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let started = Instant::now();
        let e = read(&fifo).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(e.contains("not a regular file (it is a FIFO)"), "{e}");
        assert!(e.starts_with(&fifo.display().to_string()), "{e}");

        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("it is a directory"), "{e}");
        let e = read(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("it is a character device"), "{e}");
        // A symbolic link is followed: what it points at decides.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(read(&link).unwrap_err().to_string().contains("a FIFO"));
    }

    #[test]
    fn refuses_a_file_over_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'x'; 11]).unwrap();
        let e = read_capped(&p, 10).unwrap_err().to_string();
        assert!(e.contains("larger than 10 bytes"), "{e}");
        assert_eq!(read_capped(&p, 11).unwrap().len(), 11);
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(
            read_to_string(&p)
                .unwrap_err()
                .to_string()
                .contains("not UTF-8")
        );
    }
}
