//! The admin Unix socket's file: bound so that it is never reachable with wider permissions than
//! [`MODE`], and removed at exit only while the path still names it.
//!
//! [`bind`] binds the socket in a fresh private directory (mode 0700) created next to the
//! configured path, sets the socket's mode to 0660 there, and renames it onto the path. Whatever
//! the umask, nobody but the owner can reach the socket before its mode is set (the process-wide
//! umask is never changed: other threads create files), and the path switches atomically from the
//! socket that was there, if any, to this one, never missing in between. A socket already at the
//! path is replaced, as before: a stale one left by a process that is gone, or the live one of the
//! process this one upgrades (docs/operations.md "Upgrades without a gap"); anything else at the path is an
//! error and is left alone. [`SocketFile`] remembers the file's device and inode; dropped when
//! serving stops, it removes the path only if it still names that same file, so an old process
//! exiting after an upgrade leaves the new process's socket in place.
//!
//! Two windows remain, both only between fulcrum processes on one path: a file put at the path
//! between [`bind`]'s look and its rename is replaced, and a socket renamed onto the path between
//! the exit's look and its unlink is removed (POSIX has no "unlink if still this inode").

use std::fs::{DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The socket file's mode: its owner and group may connect, nobody else.
pub(crate) const MODE: u32 = 0o660;
/// Name of the socket inside the private directory (short: a Unix socket path is at most 107 bytes).
const TEMPORARY: &str = "s";
/// Private directories tried (names taken by a crashed process's leftovers are skipped).
const ATTEMPTS: u32 = 100;

/// The admin socket's file at its path, as this process bound it. Dropping it removes the path if
/// it still names this file.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// A duplicate of the listening socket, closed only after the path is judged: while a socket
    /// is bound to it, the file's inode cannot be freed and reused by another file, so device and
    /// inode still identify it when the path is looked at.
    _bound: UnixListener,
}

impl SocketFile {
    /// The configured path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the file this process bound (no newer process replaced it).
    pub(crate) fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the admin socket at `path` (non-blocking, mode [`MODE`]), as the module documentation
/// describes, and returns it with its [`SocketFile`].
pub(crate) fn bind(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket (only a socket there is replaced)",
            ));
        }
    }
    let private = PrivateDir::next_to(path)?;
    let temporary = private.path.join(TEMPORARY);
    let within =
        |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", temporary.display()));
    let listener = UnixListener::bind(&temporary).map_err(|e| within("cannot bind", e))?;
    std::fs::set_permissions(&temporary, Permissions::from_mode(MODE))
        .map_err(|e| within("cannot set the mode of", e))?;
    let meta = std::fs::symlink_metadata(&temporary).map_err(|e| within("cannot look at", e))?;
    listener.set_nonblocking(true)?;
    let bound = listener.try_clone()?;
    // Only now does the socket become reachable, already 0660.
    std::fs::rename(&temporary, path).map_err(|e| within("cannot move into place", e))?;
    drop(private);
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
        _bound: bound,
    };
    Ok((listener, file))
}

/// A directory only this process's user can enter, next to the socket path (so on the same
/// filesystem, which `rename` needs), removed with what is left in it on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn next_to(target: &Path) -> io::Result<PrivateDir> {
        let parent = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let pid = std::process::id();
        let mut attempt = 0;
        loop {
            let path = parent.join(format!(".fulcrum-{pid}-{attempt}"));
            // Created 0700 or narrower (the umask only takes bits away) ...
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = PrivateDir { path };
                    // ... then exactly 0700 (chmod is not subject to the umask).
                    std::fs::set_permissions(&dir.path, Permissions::from_mode(0o700)).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot set the mode of {}: {e}", dir.path.display()),
                        )
                    })?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt + 1 < ATTEMPTS => attempt += 1,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cannot create the private directory {} to bind in: {e}",
                            path.display()
                        ),
                    ))
                }
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // The socket is there only if it never made it onto its path.
        let _ = std::fs::remove_file(self.path.join(TEMPORARY));
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[cfg(test)]
mod tests;
