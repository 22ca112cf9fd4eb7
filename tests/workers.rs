//! `[runtime] scheduler = "per_worker"` end to end: each worker a thread with a runtime of its
//! own, serving plain and mTLS listeners, across a reload, from sockets the server bound (one per
//! worker) and from a single socket the caller passed (a copy for each worker); the threads end
//! with the server.
//!
//! One test in this file: it counts the process's worker threads, which another test's server
//! would change.

mod common;

use common::tls::{assert_echoes, connect_tls, Pki};
use common::{connect, round_trip, TempDir, TestBackend, TestServer};
use fulcrum::{Config, Server};
use tokio::net::TcpListener;

/// The process's threads named as fulcrum's worker threads are.
fn worker_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("list /proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("fulcrum-w"))
        .count()
}

const PER_WORKER: &str = "[runtime]\nworkers = 3\nscheduler = \"per_worker\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_worker_threads_serve_every_listener_across_a_reload_and_end_with_the_server() {
    let pki = Pki::new(&[]);
    let echo = TestBackend::echo().await;
    let dir = TempDir::new("per-worker");
    let rest = format!("[authorization]\nalice = [\"web\"]\n\n{PER_WORKER}");
    let text = pki.one_pool_config(&pki.ca_file, "1.2", "", &[echo.addr], &rest);
    let path = dir.write("fulcrum.toml", &text);
    let lb = TestServer::start_file(&path).await;
    assert_eq!(worker_threads(), 3, "one thread per worker once bound");

    let alice = pki.client_config(Some(&pki.client("alice")));
    let mut tls = Vec::new();
    for i in 0..12u8 {
        let mut stream = connect_tls(lb.addr("tls"), &alice, "localhost")
            .await
            .expect("handshake");
        assert_echoes(&mut stream, &[i; 32]).await;
        tls.push(stream);
    }

    // A reload adds a plain listener: its sockets are bound and handed to the workers.
    let plain = "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n";
    lb.reload_file(&path, &format!("{text}\n{plain}"))
        .await
        .expect("reload");
    let mut clients = Vec::new();
    for i in 0..12u8 {
        let mut client = connect(lb.addr("plain")).await;
        assert_eq!(round_trip(&mut client, &[i; 16]).await, [i; 16]);
        clients.push(client);
    }
    for (i, stream) in (0u8..).zip(tls.iter_mut()) {
        assert_echoes(stream, &[i; 8]).await;
    }
    assert_eq!(worker_threads(), 3, "a reload starts no threads");
    drop((tls, clients));
    lb.stopped().await;
    assert_eq!(worker_threads(), 0, "the threads end with the server");

    // One socket from the caller: every worker accepts from it.
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("bound address");
    let text = format!(
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"{}\"]\n\n{PER_WORKER}",
        echo.addr
    );
    let config = Config::from_toml(&text, "<test>").expect("valid config");
    let server = Server::from_listeners(config, vec![("main".into(), socket)], None).expect("server");
    let lb = TestServer::running(server);
    let mut clients = Vec::new();
    for i in 0..12u8 {
        let mut client = connect(addr).await;
        assert_eq!(round_trip(&mut client, &[i; 16]).await, [i; 16]);
        clients.push(client);
    }
    drop(clients);
    lb.stopped().await;
    assert_eq!(worker_threads(), 0);
}
