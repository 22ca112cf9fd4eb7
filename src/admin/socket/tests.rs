use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};

use super::*;

/// Set in the environment of the copy of a test that runs under a umask of 0.
const UMASK_0: &str = "FULCRUM_TEST_UMASK_0";
/// How long any wait may take before the test fails (it only bounds bugs).
const DEADLINE: Duration = Duration::from_secs(10);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fulcrum-socket-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The names in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Whether a client can connect to the socket at `path`.
fn answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Whether this is the copy of test `name` running under umask 0. If not, runs that copy (`sh -c
/// 'umask 0; exec ...'`, this test binary, only `name`), asserts it ran and passed, and returns
/// false: the caller then returns. The umask is per process, so other tests are not affected.
fn under_umask_0(name: &str) -> bool {
    if std::env::var_os(UMASK_0).is_some() {
        return true;
    }
    let output = std::process::Command::new("sh")
        .args(["-c", "umask 0 && exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(UMASK_0, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the copy under umask 0 failed or did not run ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    false
}

#[test]
fn under_a_umask_of_0_the_socket_reaches_its_path_only_by_rename_already_0660() {
    if !under_umask_0(
        "admin::socket::tests::under_a_umask_of_0_the_socket_reaches_its_path_only_by_rename_already_0660",
    ) {
        return;
    }
    let dir = TempDir::new("umask");
    let probe = dir.0.join("probe");
    std::fs::write(&probe, "").unwrap();
    assert_eq!(mode(&probe), 0o666, "this copy does not run under umask 0");
    std::fs::remove_file(&probe).unwrap();
    let target = dir.0.join("admin.sock");
    let (events, seen) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events.send(event);
    })
    .unwrap();
    watcher.watch(&dir.0, RecursiveMode::NonRecursive).unwrap();

    let (_listener, file) = bind(&target).unwrap();

    // The first thing that happens at the path: created there (reachable before its chmod, with
    // the umask's 0777), or renamed onto it from the private directory (already 0660).
    let start = Instant::now();
    let first = loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let event = seen
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no event at {} within {DEADLINE:?}: {e}", target.display()))
            .unwrap();
        if event.paths.iter().any(|p| p == &target) {
            break event.kind;
        }
    };
    assert_eq!(
        first,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)),
        "the socket must appear at its path by rename"
    );
    assert_eq!(mode(&target), MODE);
    assert!(answers(&target));
    assert_eq!(
        dir.names(),
        ["admin.sock"],
        "the private directory is left behind"
    );
    drop(file);
    assert!(!target.exists(), "the socket file is removed with its SocketFile");
}

#[test]
fn a_newer_bind_replaces_the_socket_and_the_older_one_leaves_it_in_place() {
    let dir = TempDir::new("upgrade");
    let target = dir.0.join("admin.sock");
    let (old_listener, old) = bind(&target).unwrap();
    assert_eq!(mode(&target), MODE);
    // An upgrade: a second process binds the same path while the first still serves.
    let (_new_listener, new) = bind(&target).unwrap();
    assert!(!old.is_ours() && new.is_ours());
    // The first exits.
    drop(old);
    drop(old_listener);
    assert!(
        answers(&target),
        "the older process removed the newer one's socket"
    );
    drop(new);
    assert!(!target.exists());
    assert!(dir.names().is_empty(), "{:?}", dir.names());
}

#[test]
fn a_stale_socket_is_replaced_and_anything_else_at_the_path_is_refused_and_kept() {
    let dir = TempDir::new("stale");
    let target = dir.0.join("admin.sock");
    // Left by a process that is gone: a socket file nobody listens on.
    drop(UnixListener::bind(&target).unwrap());
    assert!(!answers(&target));
    let (_listener, file) = bind(&target).unwrap();
    assert!(file.is_ours() && answers(&target));
    drop(file);

    let regular = dir.0.join("not-a-socket");
    std::fs::write(&regular, "data").unwrap();
    let e = bind(&regular).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&regular).unwrap(), "data");
    assert_eq!(
        dir.names(),
        ["not-a-socket"],
        "a private directory is left behind"
    );
}
