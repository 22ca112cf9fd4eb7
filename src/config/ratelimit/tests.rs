use std::time::Duration;

use crate::config::{Config, SharedConcurrency};

const BASE: &str = "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n";

/// A config with `rate_limit` (the `[rate_limit]` keys after capacity and window) and `shared`
/// (the `[rate_limit.shared]` keys after redis).
fn parse(rate_limit: &str, shared: &str) -> Result<Config, String> {
    let text = format!(
        "{BASE}[rate_limit]\ncapacity = 20\nwindow = '1m'\n{rate_limit}\n\
         [rate_limit.shared]\nredis = 'redis://127.0.0.1:6379'\n{shared}\n"
    );
    Config::from_toml(&text, "t.toml").map_err(|e| e.to_string())
}

fn concurrency(config: Config) -> Option<SharedConcurrency> {
    config
        .rate_limit
        .and_then(|r| r.shared)
        .and_then(|s| s.concurrency)
}

fn refused(rate_limit: &str, shared: &str) -> String {
    match parse(rate_limit, shared) {
        Ok(_) => panic!("accepted but should not be: {rate_limit} {shared}"),
        Err(e) => e,
    }
}

#[test]
fn shared_concurrency_with_max_concurrent_shares_that_cap_with_a_ten_second_lease() {
    let config = parse("max_concurrent = 4", "shared_concurrency = true").expect("valid");
    assert_eq!(
        concurrency(config),
        Some(SharedConcurrency {
            max_concurrent: 4,
            lease: Duration::from_secs(10)
        })
    );
    let tuned = parse(
        "max_concurrent = 4",
        "shared_concurrency = true\nconcurrency_lease = '2s'",
    )
    .expect("valid");
    assert_eq!(concurrency(tuned).map(|c| c.lease), Some(Duration::from_secs(2)));
}

#[test]
fn without_shared_concurrency_max_concurrent_stays_per_instance() {
    for shared in ["", "shared_concurrency = false"] {
        let config = parse("max_concurrent = 4", shared).expect("valid");
        assert_eq!(concurrency(config), None, "{shared}");
    }
}

#[test]
fn shared_concurrency_without_max_concurrent_is_refused() {
    let e = refused("", "shared_concurrency = true");
    assert!(
        e.contains("rate_limit.shared.shared_concurrency") && e.contains("max_concurrent"),
        "{e}"
    );
}

#[test]
fn shared_concurrency_outside_rate_limit_shared_is_refused() {
    let e = refused("max_concurrent = 4\nshared_concurrency = true", "");
    assert!(e.contains("shared_concurrency"), "{e}");
    let text = format!(
        "{BASE}[rate_limit]\ncapacity = 20\nwindow = '1m'\nmax_concurrent = 4\nshared_concurrency = true\n"
    );
    let e = Config::from_toml(&text, "t.toml")
        .expect_err("refused")
        .to_string();
    assert!(e.contains("shared_concurrency"), "{e}");
}

#[test]
fn a_concurrency_lease_without_shared_concurrency_is_refused() {
    let e = refused("max_concurrent = 4", "concurrency_lease = '5s'");
    assert!(
        e.contains("rate_limit.shared.concurrency_lease") && e.contains("shared_concurrency = true"),
        "{e}"
    );
}

#[test]
fn a_concurrency_lease_too_short_for_three_refreshes_within_timeout_is_refused() {
    for shared in [
        "concurrency_lease = '500ms'",
        "timeout = '1s'\nconcurrency_lease = '3s'",
        // The default lease too, against a long timeout.
        "timeout = '4s'",
    ] {
        let e = refused(
            "max_concurrent = 4",
            &format!("shared_concurrency = true\n{shared}"),
        );
        assert!(
            e.contains("rate_limit.shared.concurrency_lease") && e.contains("three times timeout"),
            "{shared}: {e}"
        );
    }
    let enough = parse(
        "max_concurrent = 4",
        "shared_concurrency = true\ntimeout = '1s'\nconcurrency_lease = '3100ms'",
    );
    assert!(enough.is_ok(), "{enough:?}");
}
