//! The admin plane end to end: the token, CSRF and DNS rebinding rules, the Unix socket (kept
//! across an upgrade), runtime backend states (drain, maint, ready) across reloads, `fulcrum ctl`
//! against the real binary, secrets kept out of errors and token files kept from other users, and
//! slow clients cut at the request-head deadline.
//!
//! Everything on 127.0.0.1 port 0 (and a Unix socket in a temp dir); every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::process::{output as run_binary, output_under as run_binary_under, Fulcrum};
use common::{
    backend_list, connect, http as call, round_trip, toml_path, wait_for_outcomes, wait_until, within,
    within_for, TempDir, TestBackend, TestServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "correct-horse-battery-staple";

const JSON: (&str, &str) = ("Content-Type", "application/json");

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

/// A plain listener `main` in front of `backends`, an access log, `[admin]` with `admin`.
fn config(dir: &TempDir, backends: &[SocketAddr], admin: &str) -> String {
    format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"pool\"\n\n\
         [[upstream]]\nname = \"pool\"\nbackends = [{}]\n\n[access_log]\npath = {}\n\n[admin]\n{admin}\n",
        backend_list(backends),
        toml_path(&dir.path().join("access.log")),
    )
}

fn generation(lb: &TestServer) -> u64 {
    lb.current().generation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_protected_endpoint_needs_it_and_healthz_stays_open() {
    let dir = TempDir::new("admin-token");
    let echo = TestBackend::echo().await;
    dir.write_secret("admin.token", &format!("{TOKEN}\n"));
    let path = dir.write(
        "fulcrum.toml",
        &config(
            &dir,
            &[echo.addr],
            "bind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
        ),
    );
    let lb = TestServer::start_file(&path).await;
    let admin = lb.admin.expect("admin");
    let state_path = format!("/upstreams/pool/backends/{}/state", echo.addr);
    let protected: [(&str, &str, &str); 4] = [
        ("GET", "/", ""),
        ("GET", "/status", ""),
        ("POST", "/reload", ""),
        ("POST", state_path.as_str(), "{\"state\":\"ready\"}"),
    ];
    for (method, path, body) in protected {
        let (status, _) = call(admin, method, path, &[JSON], body).await;
        assert_eq!(status, 401, "{method} {path} without a token");
        let wrong = bearer("correct-horse-battery-stapler");
        let (status, _) = call(admin, method, path, &[JSON, (wrong.0, &wrong.1)], body).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
        let right = bearer(TOKEN);
        let (status, answer) = call(admin, method, path, &[JSON, (right.0, &right.1)], body).await;
        assert_eq!(status, 200, "{method} {path} with the token: {answer}");
    }
    assert_eq!(
        call(admin, "GET", "/healthz", &[], "").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(call(admin, "GET", "/metrics", &[], "").await.0, 200);

    // metrics_auth puts /metrics behind the token too.
    std::fs::write(
        &path,
        config(
            &dir,
            &[echo.addr],
            "bind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\nmetrics_auth = true",
        ),
    )
    .expect("write");
    within("a reload", lb.handle.reload()).await.expect("reload");
    assert_eq!(call(admin, "GET", "/metrics", &[], "").await.0, 401);
    let right = bearer(TOKEN);
    let (status, metrics) = call(admin, "GET", "/metrics", &[(right.0, &right.1)], "").await;
    assert_eq!(status, 200);
    assert!(
        !metrics.contains(TOKEN) && metrics.contains("fulcrum_config_generation 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_rebinding_hosts_and_form_posts_are_refused_and_change_nothing() {
    let dir = TempDir::new("admin-csrf");
    let echo = TestBackend::echo().await;
    let path = dir.write(
        "fulcrum.toml",
        &config(&dir, &[echo.addr], "bind = \"127.0.0.1:0\""),
    );
    let lb = TestServer::start_file(&path).await;
    let admin = lb.admin.expect("admin");
    let own = format!("http://{admin}");
    for headers in [
        vec![JSON, ("Origin", "http://evil.example")],
        vec![JSON, ("Host", "evil.example:9000")],
        vec![("Content-Type", "application/x-www-form-urlencoded")],
        vec![("Content-Type", "text/plain")],
        vec![],
    ] {
        let (status, why) = call(admin, "POST", "/reload", &headers, "a=b").await;
        assert_eq!(status, 403, "{headers:?}: {why}");
    }
    let (status, _) = call(admin, "GET", "/status", &[("Host", "rebound.example")], "").await;
    assert_eq!(status, 403, "a rebinding read of /status");
    assert_eq!(generation(&lb), 1, "a refused request changed something");
    let (status, body) = call(admin, "POST", "/reload", &[JSON, ("Origin", &own)], "").await;
    assert_eq!((status, body.contains("\"generation\":2")), (200, true), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_non_loopback_address_without_a_token_mutations_are_refused_and_check_warns() {
    let dir = TempDir::new("admin-exposed");
    let echo = TestBackend::echo().await;
    let path = dir.write(
        "fulcrum.toml",
        &config(&dir, &[echo.addr], "bind = \"0.0.0.0:0\""),
    );
    let lb = TestServer::start_file(&path).await;
    let port = lb.admin.expect("admin").port();
    let admin: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    assert_eq!(call(admin, "POST", "/reload", &[JSON], "").await.0, 403);
    assert_eq!(call(admin, "GET", "/status", &[], "").await.0, 200);
    assert_eq!(generation(&lb), 1);

    let checked = run_binary(&["check", "--config", path.to_str().expect("UTF-8 path")]).await;
    assert!(checked.status.success(), "{checked:?}");
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("token_file") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_serves_ctl_and_refuses_another_users_process() {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let dir = TempDir::new("admin-socket");
    let echo = TestBackend::echo().await;
    let socket = dir.path().join("admin.sock");
    let path = dir.write(
        "fulcrum.toml",
        &config(&dir, &[echo.addr], &format!("socket = {}", toml_path(&socket))),
    );
    let mut fulcrum = Fulcrum::run(&path);
    fulcrum.listening("main").await;
    wait_until("the admin socket exists", || socket.exists()).await;
    let meta = std::fs::symlink_metadata(&socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");
    let socket_arg = socket.to_str().expect("UTF-8 path");

    let status = run_binary(&["ctl", "--socket", socket_arg, "status"]).await;
    assert!(status.status.success(), "{status:?}");
    assert!(stdout(&status).contains("upstream pool"), "{}", stdout(&status));
    let reload = run_binary(&["ctl", "--socket", socket_arg, "--json", "reload"]).await;
    assert!(reload.status.success(), "{reload:?}");
    assert_eq!(stdout(&reload).trim(), "{\"result\":\"ok\",\"generation\":2}");

    // Not root, not the socket's group: no connection at all, so ctl says unreachable (2).
    let other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let refused = run_binary_under(&other, &["ctl", "--socket", socket_arg, "status"]).await;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ermission denied"),
        "{refused:?}"
    );
    fulcrum.signal("TERM");
    let (exit, _) = fulcrum.exit().await;
    assert!(exit.success());
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_connections_maint_closes_them_ready_returns_and_reloads_keep_the_state() {
    let dir = TempDir::new("admin-drain");
    let a = TestBackend::echo().await;
    let b = TestBackend::echo().await;
    let admin_keys = "bind = \"127.0.0.1:0\"";
    let path = dir.write("fulcrum.toml", &config(&dir, &[a.addr, b.addr], admin_keys));
    let lb = TestServer::start_file(&path).await;
    let (addr, admin) = (lb.addr("main"), lb.admin.expect("admin"));
    let set = |backend: SocketAddr, state: &'static str| async move {
        let path = format!("/upstreams/pool/backends/{backend}/state");
        call(
            admin,
            "POST",
            &path,
            &[JSON],
            &format!("{{\"state\":\"{state}\"}}"),
        )
        .await
    };
    // One held connection on each backend (least connections spreads them).
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut stream = connect(addr).await;
        assert_eq!(round_trip(&mut stream, &[i]).await, [i]);
        held.push(stream);
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 1));

    let (status, body) = set(a.addr, "drain").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"state\":\"drain\"") && body.contains("\"previous\":\"ready\""),
        "{body}"
    );
    let mut more = Vec::new();
    for i in 0..4u8 {
        let mut stream = connect(addr).await;
        assert_eq!(round_trip(&mut stream, &[i]).await, [i]);
        more.push(stream);
    }
    assert_eq!(
        (a.accepted(), b.accepted()),
        (1, 5),
        "a drained backend took a new connection"
    );
    for (i, stream) in held.iter_mut().enumerate() {
        assert_eq!(
            round_trip(stream, b"still").await,
            b"still",
            "held connection {i}"
        );
    }
    let (code, snapshot) = call(admin, "GET", "/status", &[], "").await;
    assert_eq!(code, 200);
    assert!(snapshot.contains("\"admin_state\":\"drain\""), "{snapshot}");

    // A reload that keeps the backend keeps its state.
    within("a reload", lb.handle.reload()).await.expect("reload");
    let mut after = connect(addr).await;
    assert_eq!(round_trip(&mut after, b"x").await, b"x");
    assert_eq!(a.accepted(), 1, "drain was lost by a reload");

    let (status, _) = set(a.addr, "maint").await;
    assert_eq!(status, 200);
    common::assert_ends(&mut held[0], "the connection to the backend in maint").await;
    wait_for_outcomes(&dir.path().join("access.log"), "backend_maint", 1).await;
    assert_eq!(round_trip(&mut held[1], b"other").await, b"other");

    let (status, _) = set(a.addr, "ready").await;
    assert_eq!(status, 200);
    let mut back = connect(addr).await;
    assert_eq!(round_trip(&mut back, b"back").await, b"back");
    assert_eq!(a.accepted(), 2, "ready did not bring the backend back");

    // Removed by a reload and added again: a new backend, ready.
    set(a.addr, "drain").await;
    std::fs::write(&path, config(&dir, &[b.addr], admin_keys)).expect("write");
    within("a reload", lb.handle.reload()).await.expect("reload");
    std::fs::write(&path, config(&dir, &[a.addr, b.addr], admin_keys)).expect("write");
    within("a reload", lb.handle.reload()).await.expect("reload");
    let (_, snapshot) = call(admin, "GET", "/status", &[], "").await;
    assert!(!snapshot.contains("\"admin_state\":\"drain\""), "{snapshot}");
    let metrics = fulcrum::admin::prometheus::render(&lb.current());
    assert!(
        metrics.contains(&format!(
            "fulcrum_backend_admin_state{{upstream=\"pool\",backend=\"{}\",state=\"ready\"}} 1",
            a.addr
        )),
        "{metrics}"
    );
    let (status, _) = set("127.0.0.1:1".parse().expect("address"), "drain").await;
    assert_eq!(status, 404, "an unknown backend");
    let (status, _) = call(
        admin,
        "POST",
        "/upstreams/pool/backends/x/state",
        &[JSON],
        "{\"state\":\"asleep\"}",
    )
    .await;
    assert_eq!(status, 400, "an unknown state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_ctl_runs_every_command_against_the_binary_in_text_and_json() {
    let dir = TempDir::new("admin-ctl");
    let a = TestBackend::echo().await;
    dir.write_secret("admin.token", TOKEN);
    let path = dir.write(
        "fulcrum.toml",
        &config(
            &dir,
            &[a.addr],
            "bind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
        ),
    );
    let mut fulcrum = Fulcrum::run(&path);
    fulcrum.listening("main").await;
    let admin = fulcrum.admin_addr().await;
    let admin_arg = admin.to_string();
    let token = dir.path().join("admin.token");
    let token_arg = token.to_str().expect("UTF-8 path");
    let backend = a.addr.to_string();
    let ctl = |args: Vec<String>| {
        let mut all = vec![
            "ctl".to_string(),
            "--admin".into(),
            admin_arg.clone(),
            "--token-file".into(),
            token_arg.into(),
        ];
        all.extend(args);
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            run_binary(&refs).await
        }
    };
    let words = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let status = ctl(words(&["status"])).await;
    assert!(status.status.success(), "{status:?}");
    assert!(
        stdout(&status).contains(&backend) && stdout(&status).contains("ready"),
        "{}",
        stdout(&status)
    );
    let json = ctl(words(&["--json", "status"])).await;
    let value: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("JSON");
    assert_eq!(value["generation"], 1);
    for (command, state) in [("drain", "drain"), ("maint", "maint"), ("ready", "ready")] {
        let text = ctl(words(&[command, "pool", &backend])).await;
        assert!(text.status.success(), "{text:?}");
        assert!(
            stdout(&text).contains(&format!(": {state} (was")),
            "{}",
            stdout(&text)
        );
        let json = ctl(words(&["--json", command, "pool", &backend])).await;
        let value: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("JSON");
        assert_eq!(value["state"], state);
    }
    let reload = ctl(words(&["reload"])).await;
    assert_eq!(stdout(&reload).trim(), "reloaded: generation 2");
    let json = ctl(words(&["--json", "reload"])).await;
    assert_eq!(stdout(&json).trim(), "{\"result\":\"ok\",\"generation\":3}");

    // Refused (1): an unknown backend, no token. Unreachable (2): nothing listens.
    let unknown = ctl(words(&["drain", "pool", "10.9.9.9:1"])).await;
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    let untokened = run_binary(&["ctl", "--admin", &admin_arg, "status"]).await;
    assert_eq!(untokened.status.code(), Some(1), "{untokened:?}");
    let nowhere = run_binary(&["ctl", "--admin", &common::refused_addr().to_string(), "status"]).await;
    assert_eq!(nowhere.status.code(), Some(2), "{nowhere:?}");
    fulcrum.signal("TERM");
    fulcrum.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_check_errors_and_the_reload_answer() {
    let dir = TempDir::new("admin-secrets");
    let echo = TestBackend::echo().await;
    let base = config(&dir, &[echo.addr], "bind = \"127.0.0.1:0\"");
    let path = dir.write("fulcrum.toml", &base);
    let lb = TestServer::start_file(&path).await;
    let admin = lb.admin.expect("admin");
    let secret = "sw0rd/fish?#42";
    for broken in [
        // An unparsable URL whose password holds / ? #.
        format!("{base}[rate_limit]\ncapacity = 1\nwindow = \"1s\"\n[rate_limit.shared]\nredis = \"redis://user:{secret}@no such host\"\n"),
        // A TOML syntax error on the line with the password.
        format!("{base}[rate_limit]\ncapacity = 1\nwindow = \"1s\"\n[rate_limit.shared]\nredis = \"redis://:{secret}@127.0.0.1\n"),
    ] {
        let file = dir.write("broken.toml", &broken);
        let checked = run_binary(&["check", "--config", file.to_str().expect("UTF-8 path")]).await;
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert!(!checked.status.success(), "{stderr}");
        assert!(!stderr.contains("sw0rd") && !stderr.contains("fish"), "{stderr}");

        std::fs::write(&path, &broken).expect("write");
        let (status, body) = call(admin, "POST", "/reload", &[JSON], "").await;
        assert_eq!(status, 422, "{body}");
        assert!(!body.contains("sw0rd") && !body.contains("fish"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_the_old_process_leaves_the_new_ones_admin_socket_and_ctl_reaches_it() {
    let dir = TempDir::new("admin-upgrade");
    let echo = TestBackend::echo().await;
    let socket = dir.path().join("admin.sock");
    let path = dir.write(
        "fulcrum.toml",
        &config(&dir, &[echo.addr], &format!("socket = {}", toml_path(&socket))),
    );
    let socket_arg = socket.to_str().expect("UTF-8 path");
    let serving_socket = |line: &str| line.contains("admin listening on a Unix socket").then_some(());

    let mut old = Fulcrum::run(&path);
    old.listening("main").await;
    old.wait_for_line("the old process's admin socket", serving_socket)
        .await;
    // The upgrade: a second process on the same config, then the first one stopped.
    let mut new = Fulcrum::run(&path);
    new.listening("main").await;
    new.wait_for_line("the new process's admin socket", serving_socket)
        .await;
    old.signal("TERM");
    let (exit, rest) = old.exit().await;
    assert!(exit.success(), "the old process exited with {exit}: {rest:#?}");

    let status = run_binary(&["ctl", "--socket", socket_arg, "status"]).await;
    assert!(
        status.status.success(),
        "ctl after the old process exited: {status:?}"
    );
    assert!(stdout(&status).contains("upstream pool"), "{}", stdout(&status));
    new.signal("TERM");
    let (exit, _) = new.exit().await;
    assert!(exit.success());
    assert!(!socket.exists(), "the new process removes its own socket at exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_readable_by_others_is_refused_by_check_naming_it_and_its_mode_and_0600_is_accepted() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("admin-token-mode");
    let echo = TestBackend::echo().await;
    let token = dir.write_secret("admin.token", TOKEN);
    let path = dir.write(
        "fulcrum.toml",
        &config(
            &dir,
            &[echo.addr],
            "bind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
        ),
    );
    let config_arg = path.to_str().expect("UTF-8 path");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let refused = run_binary(&["check", "--config", config_arg]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("admin.token_file")
            && stderr.contains(&token.display().to_string())
            && stderr.contains("readable by group or others (mode 0644)")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!stderr.contains(TOKEN), "{stderr}");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let accepted = run_binary(&["check", "--config", config_arg]).await;
    assert!(accepted.status.success(), "{accepted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_slower_than_the_head_deadline_to_send_a_request_head_are_cut_and_free_their_slots() {
    use fulcrum::admin::{HEAD_DEADLINE, MAX_CONNECTIONS, REQUEST_DEADLINE};
    let dir = TempDir::new("admin-slow-head");
    let echo = TestBackend::echo().await;
    let path = dir.write(
        "fulcrum.toml",
        &config(&dir, &[echo.addr], "bind = \"127.0.0.1:0\""),
    );
    let lb = TestServer::start_file(&path).await;
    let admin = lb.admin.expect("admin");
    // As many slow clients as there are slots, each with half a request head.
    let mut slow = Vec::with_capacity(MAX_CONNECTIONS);
    for _ in 0..MAX_CONNECTIONS {
        let mut stream = connect(admin).await;
        within(
            "half a request head",
            stream.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
        )
        .await
        .expect("send");
        slow.push(stream);
    }
    // Much longer than the head deadline, yet short of the whole request's: a connection cut
    // only by the latter is still open when this bound passes.
    let bound = REQUEST_DEADLINE - HEAD_DEADLINE;
    within_for(bound, "every slow client to be cut", async {
        for stream in &mut slow {
            // The end of the stream or a reset: either way the server closed it.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        }
    })
    .await;
    // Their slots are free again.
    assert_eq!(
        call(admin, "GET", "/healthz", &[], "").await,
        (200, "ok\n".to_string())
    );
}
