//! The admin plane end to end: the token, CSRF and DNS rebinding rules, the Unix socket, runtime
//! backend states (drain, maint, ready) across reloads, `fulcrum ctl` against the real binary,
//! and secrets kept out of errors.
//!
//! Everything on 127.0.0.1 port 0 (and a Unix socket in a temp dir); every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::process::Fulcrum;
use common::tls::{toml_path, TempDir};
use common::{
    backend_list, connect, http as call, round_trip, wait_for_outcomes, wait_until, within, TestBackend,
};

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

fn generation(lb: &common::TestServer) -> u64 {
    lb.current().generation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_protected_endpoint_needs_it_and_healthz_stays_open() {
    let dir = TempDir::new("admin-token");
    let echo = TestBackend::echo().await;
    dir.write("admin.token", &format!("{TOKEN}\n"));
    let path = dir.write(
        "fulcrum.toml",
        &config(
            &dir,
            &[echo.addr],
            "bind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"",
        ),
    );
    let lb = common::start_file(&path).await;
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
    let lb = common::start_file(&path).await;
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
    let lb = common::start_file(&path).await;
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

/// Runs the real `fulcrum` binary with `args` (optionally under a `wrapper` command).
async fn run_binary_under(wrapper: &[&str], args: &[&str]) -> Output {
    let binary = env!("CARGO_BIN_EXE_fulcrum");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(rest).arg(binary);
            command
        }
        None => tokio::process::Command::new(binary),
    };
    within("fulcrum to finish", command.args(args).output())
        .await
        .expect("run fulcrum")
}

async fn run_binary(args: &[&str]) -> Output {
    run_binary_under(&[], args).await
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
    let other = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
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
    let lb = common::start_file(&path).await;
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
    dir.write("admin.token", TOKEN);
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
    let admin = fulcrum
        .wait_for_line("the admin address", |line| {
            line.contains("admin listening")
                .then(|| {
                    line.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse::<SocketAddr>()
                        .ok()
                })
                .flatten()
        })
        .await;
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
    let lb = common::start_file(&path).await;
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
