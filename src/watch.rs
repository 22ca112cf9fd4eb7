//! `[reload] watch`: reloading by itself when the config file or a file it names changes.
//!
//! One task per generation (restarted by every reload, like the probe loops) asks the operating
//! system (the `notify` crate: inotify on Linux) about the *directory* of every file the
//! generation was built from, so that a rename over a file (an atomic write) and a Kubernetes
//! `..data` symlink swap are seen, not only writes in place. After an event on one of those
//! files (or on a `..`-prefixed entry, Kubernetes' atomic writer), it waits until the
//! directories have been quiet for `debounce`, so that a set of files written one after the
//! other is applied once, then compares the files' bytes with what it last saw: unchanged files
//! are no reason to reload; changed ones are reloaded exactly as SIGHUP does. A reload that
//! fails leaves the old configuration serving (the server logs why) and is tried again at the
//! next change. This module decides when to reload; the reload is the server's, and the list of
//! files and their [`Fingerprint`] are the config's (`config::files`).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::files::{fingerprint, Fingerprint};
use crate::reload::Handle;

/// Events buffered between the watcher's thread and the task; more are dropped, which loses
/// nothing: one pending event is enough to look at the files.
const EVENT_QUEUE: usize = 64;

/// Watches `files` until `stop`, reloading through `handle` when they change from `loaded`,
/// their fingerprint taken just before the generation read them (so a change made before this
/// task started watching is not missed).
pub(crate) async fn run(
    handle: Handle,
    files: Vec<PathBuf>,
    loaded: Fingerprint,
    debounce: Duration,
    stop: CancellationToken,
) {
    let (events, mut inbox) = mpsc::channel(EVENT_QUEUE);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events.try_send(event);
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(e) => {
            warn!(error = %e, "[reload] watch: cannot watch files; reload with SIGHUP instead");
            return;
        }
    };
    let directories: HashSet<PathBuf> = files.iter().map(|f| directory(f)).collect();
    for dir in &directories {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            warn!(directory = %dir.display(), error = %e, "[reload] watch: cannot watch this directory");
        }
    }
    let names: HashSet<OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(Into::into))
        .collect();
    let mut seen = loaded;
    // A change between the load and the first watch: look at the files once without an event.
    let mut changed = unblocked(files.clone()).await != seen;
    debug!(
        files = files.len(),
        directories = directories.len(),
        "watching configuration files"
    );
    loop {
        // Wait for an event that concerns our files.
        while !changed {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = inbox.recv() => match event {
                    None => return,
                    Some(event) => changed = relevant(&event, &names),
                },
            }
        }
        changed = false;
        // Then for `debounce` of quiet.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = inbox.recv() => if event.is_none() { return },
                _ = tokio::time::sleep(debounce) => break,
            }
        }
        let now = unblocked(files.clone()).await;
        if now == seen {
            continue;
        }
        seen = now;
        info!("[reload] watch: configuration files changed, reloading");
        if handle.reload().await.is_ok() {
            // The new generation watches its own files from here on.
            return;
        }
    }
}

/// The directory a file is in (`.` for a bare name).
fn directory(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether an event may change one of our files: not a mere access, and about one of their
/// names or a `..`-prefixed entry (Kubernetes' `..data` and its timestamped directories). A
/// watcher error counts too, since it may have hidden a change.
fn relevant(event: &notify::Result<notify::Event>, names: &HashSet<OsString>) -> bool {
    let Ok(event) = event else {
        return true;
    };
    if matches!(event.kind, EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|path| {
        path.file_name()
            .is_some_and(|name| names.contains(name) || name.to_string_lossy().starts_with(".."))
    })
}

/// [`fingerprint`] off the runtime's threads.
async fn unblocked(files: Vec<PathBuf>) -> Fingerprint {
    tokio::task::spawn_blocking(move || fingerprint(&files))
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(kind).add_path(PathBuf::from(path)))
    }

    #[test]
    fn events_on_watched_names_and_kubernetes_entries_are_relevant_and_others_are_not() {
        let names: HashSet<OsString> = ["server.pem".into(), "fulcrum.toml".into()].into_iter().collect();
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(relevant(&event(rename, "/etc/f/server.pem"), &names));
        assert!(relevant(&event(rename, "/etc/f/..data"), &names));
        assert!(relevant(
            &event(EventKind::Create(CreateKind::File), "/etc/f/fulcrum.toml"),
            &names
        ));
        assert!(!relevant(
            &event(EventKind::Modify(ModifyKind::Any), "/etc/f/access.log"),
            &names
        ));
        assert!(!relevant(
            &event(EventKind::Access(AccessKind::Any), "/etc/f/server.pem"),
            &names
        ));
    }

    #[test]
    fn a_file_in_the_working_directory_is_watched_there() {
        assert_eq!(directory(Path::new("fulcrum.toml")), PathBuf::from("."));
        assert_eq!(directory(Path::new("/etc/f/a.pem")), PathBuf::from("/etc/f"));
    }
}
