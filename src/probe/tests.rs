use super::*;
use crate::config::{Config, OnDown};
use std::io;
use std::time::Duration;

#[test]
fn timeouts_and_refusals_are_failures_reported_with_different_reasons() {
    let timeout = Duration::from_secs(1);
    let refused = Failure::from_connect(io::ErrorKind::ConnectionRefused.into(), timeout);
    let timed_out = Failure::from_connect(io::ErrorKind::TimedOut.into(), timeout);
    let other = Failure::from_connect(io::ErrorKind::HostUnreachable.into(), timeout);
    assert_eq!(refused.to_string(), "connect refused");
    assert_eq!(timed_out.to_string(), "timed out after 1s");
    assert!(other.to_string().starts_with("connect failed: "), "{other}");

    let upstream = upstream("fall = 2");
    record(&upstream, 0, Source::Probe, Err(timed_out));
    assert!(upstream.backends[0].is_up());
    record(&upstream, 0, Source::Traffic, Err(refused));
    assert!(!upstream.backends[0].is_up(), "both kinds count toward fall");
    assert!(!upstream.pool.any_in_rotation());
    assert_eq!(upstream.backends[0].health.went_down.get(), 1);
}

#[test]
fn probes_failing_for_want_of_local_descriptors_or_memory_never_move_a_backend_toward_down() {
    let upstream = upstream("fall = 2\nrise = 1");
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: at connect, or once connected (send/expect).
    for errno in [24, 23, 105, 12] {
        for failure in [
            Failure::from_connect(io::Error::from_raw_os_error(errno), Duration::from_secs(1)),
            Failure::Io(io::Error::from_raw_os_error(errno)),
        ] {
            assert_eq!(record_probe(&upstream, 0, Err(failure)), Probed::Local);
        }
    }
    let backend = &upstream.backends[0];
    assert!(backend.is_up() && upstream.pool.any_in_rotation());
    assert_eq!(backend.health.went_down.get(), 0);
    // Nor did they start a failure streak: one real failure is still one short of `fall`.
    assert_eq!(
        record_probe(&upstream, 0, Err(Failure::Refused)),
        Probed::Recorded
    );
    assert!(backend.is_up(), "a local failure counted toward fall");
    record_probe(&upstream, 0, Err(Failure::Refused));
    assert!(!backend.is_up(), "a real failure is still counted");
}

#[test]
fn jitter_stays_within_ten_percent_of_the_interval() {
    let interval = Duration::from_secs(2);
    assert_eq!(jittered(interval, 0.0), Duration::from_millis(1800));
    assert_eq!(jittered(interval, 0.5), interval);
    assert!(jittered(interval, 0.999_999) < Duration::from_millis(2200));
    let mut rng = Rng::seeded(7);
    for _ in 0..1000 {
        let unit = rng.unit();
        assert!((0.0..1.0).contains(&unit), "{unit}");
    }
}

#[test]
fn a_backend_marked_down_fires_its_down_signal_and_a_fresh_one_after_it_comes_back() {
    let upstream = upstream("fall = 1\nrise = 1\non_down = \"close\"\nslow_start = \"10s\"");
    let signal = upstream.backends[0].health.down_signal();
    record(&upstream, 0, Source::Probe, Err(Failure::Refused));
    assert!(signal.is_cancelled());
    assert!(upstream.backends[0].health.down_signal().is_cancelled());
    record(&upstream, 0, Source::Probe, Ok(()));
    assert!(upstream.backends[0].is_up());
    assert!(!upstream.backends[0].health.down_signal().is_cancelled());
    assert!(upstream.pool.is_ramping(0, Instant::now()));
    assert_eq!(upstream.backends[0].health.went_up.get(), 1);
}

#[test]
fn a_successful_probe_of_an_up_backend_is_no_transition() {
    let upstream = upstream("");
    record(&upstream, 0, Source::Probe, Ok(()));
    record(&upstream, 0, Source::Traffic, Ok(()));
    assert!(upstream.backends[0].is_up());
    assert_eq!(upstream.backends[0].health.went_up.get(), 0);
    assert_eq!(upstream.health_check.on_down, OnDown::Keep);
}

#[tokio::test]
async fn a_probe_of_a_closed_port_is_refused() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let check = HealthCheckConfig::default();
    let outcome = once(&BackendAddr::Ip(addr), &check).await;
    assert!(matches!(outcome, Err(Failure::Refused)), "{outcome:?}");
}

#[tokio::test]
async fn a_probe_with_send_and_expect_passes_only_on_the_expected_reply() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = BackendAddr::Ip(listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 6];
            if stream.read_exact(&mut request).await.is_ok() {
                let reply: &[u8] = if &request == b"PING\r\n" {
                    b"+PONG\r\n"
                } else {
                    b"-ERR\r\n"
                };
                let _ = stream.write_all(reply).await;
            }
        }
    });
    let mut check = HealthCheckConfig {
        send: b"PING\r\n".to_vec(),
        expect: b"+PONG".to_vec(),
        ..HealthCheckConfig::default()
    };
    assert!(once(&addr, &check).await.is_ok());
    check.send = b"PONG\r\n".to_vec();
    let outcome = once(&addr, &check).await;
    assert!(matches!(outcome, Err(Failure::Mismatch)), "{outcome:?}");
}

/// An upstream with one backend and the given `[upstream.health_check]` body.
fn upstream(health_check: &str) -> Upstream {
    let text = format!(
        "[[listener]]\nname='l'\nbind='127.0.0.1:0'\nupstream='u'\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[upstream.health_check]\n{health_check}\n"
    );
    let config = Config::from_toml(&text, "test").expect("valid config");
    Upstream::new(&config.upstreams[0], None, None, &[])
}
