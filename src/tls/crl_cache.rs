//! `[listener.tls] crl_cache_dir`: the last good CRL of each fetched URL kept on disk, so that a
//! restart without the network starts with them. One file per URL (DER), named from the URL so
//! that any URL makes a safe, distinct file name; written atomically (a temporary file, mode
//! 0600, synced, then renamed over the old one), so a reader never sees half a CRL.
//!
//! This file moves bytes between the table and the disk; it trusts nothing it reads: a cached
//! CRL is checked against the listener's client trust before it is used, as a fetched one is.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The longest readable part of a file name taken from the URL (the hash keeps it distinct).
const NAME_CHARS: usize = 80;

/// The cache file of `url` in `dir`: its letters, digits, `.` and `-` (others become `_`), cut
/// to [`NAME_CHARS`], then a hash of the whole URL, then `.crl`.
pub(crate) fn path(dir: &Path, url: &str) -> PathBuf {
    let readable: String = url
        .trim_start_matches("http://")
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => c,
            _ => '_',
        })
        .take(NAME_CHARS)
        .collect();
    // `.` and `..` cannot come out: the hash follows.
    dir.join(format!("{readable}-{:016x}.crl", fnv1a(url.as_bytes())))
}

/// FNV-1a, 64 bits: stable across builds (unlike std's hasher), which a file name must be.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The cached CRL of `url`, at most `max_size` bytes; `Ok(None)` if there is none.
pub(crate) fn read(dir: &Path, url: &str, max_size: u64) -> io::Result<Option<Vec<u8>>> {
    let file = match fs::File::open(path(dir, url)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(max_size.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_size {
        return Err(io::Error::other(format!(
            "larger than crl_max_size ({max_size} bytes)"
        )));
    }
    Ok(Some(bytes))
}

/// Keeps `der` as the cached CRL of `url` (creating `dir` if needed, mode 0700).
pub(crate) fn write(dir: &Path, url: &str, der: &[u8]) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let target = path(dir, url);
    let mut temporary = target.clone().into_os_string();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(der)?;
        file.sync_all()?;
        fs::rename(&temporary, &target)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn any_url_makes_a_distinct_file_name_inside_the_directory() {
        let dir = Path::new("/cache");
        let a = path(dir, "http://pki.example/../../etc/passwd");
        assert_eq!(a.parent(), Some(dir));
        let name = a.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            name.starts_with("pki.example_.._.._etc_passwd-") && name.ends_with(".crl"),
            "{name}"
        );
        assert_ne!(path(dir, "http://a/b?c"), path(dir, "http://a/b_c"));
    }

    #[test]
    fn a_written_crl_reads_back_private_and_a_missing_one_is_none() {
        let dir = std::env::temp_dir().join(format!("fulcrum-crl-cache-{}", std::process::id()));
        let url = "http://pki.example/ca.crl";
        assert_eq!(read(&dir, url, 10).unwrap(), None);
        write(&dir, url, b"first").unwrap();
        write(&dir, url, b"second").unwrap();
        assert_eq!(read(&dir, url, 10).unwrap(), Some(b"second".to_vec()));
        let mode = fs::metadata(path(&dir, url)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(read(&dir, url, 3).is_err(), "larger than the bound");
        let _ = fs::remove_dir_all(&dir);
    }
}
