use super::*;

const GOOD: &str = r#"
drain_timeout = "5s"

[[listener]]
name = "web"
bind = "0.0.0.0:8443"
upstream = "web"

[[upstream]]
name = "web"
backends = ["10.0.0.1:80", "10.0.0.2:80", "backend.internal:8080"]
connect_timeout = "250ms"

[admin]
bind = "127.0.0.1:9000"
"#;

fn error_of(text: &str) -> String {
    match Config::from_toml(text, "test.toml") {
        Ok(_) => panic!("config was accepted but should not be:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_documented_example_loads_with_typed_values() {
    let config = Config::from_toml(GOOD, "test.toml").expect("valid config");
    assert_eq!(config.drain_timeout, Duration::from_secs(5));
    assert_eq!(config.listeners[0].bind, "0.0.0.0:8443".parse().unwrap());
    let upstream = config.upstream("web").expect("upstream web");
    assert_eq!(upstream.connect_timeout, Duration::from_millis(250));
    assert_eq!(upstream.connect_attempts, DEFAULT_CONNECT_ATTEMPTS);
    assert_eq!(
        upstream.backends[0].addr,
        BackendAddr::Ip("10.0.0.1:80".parse().unwrap())
    );
    assert_eq!(
        upstream.backends[2].addr,
        BackendAddr::Name {
            host: "backend.internal".into(),
            port: 8080
        }
    );
    assert_eq!(upstream.backends[2].addr.to_string(), "backend.internal:8080");
    assert_eq!(
        config.admin.unwrap().bind,
        Some("127.0.0.1:9000".parse().unwrap())
    );
}

#[test]
fn defaults_apply_when_optional_keys_are_absent() {
    let config = Config::from_toml(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n",
        "t",
    )
    .expect("valid");
    assert_eq!(config.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(config.upstreams[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert!(config.admin.is_none());
}

#[test]
fn an_unknown_key_is_an_error_naming_the_key() {
    let e = error_of(&GOOD.replace("connect_timeout", "conect_timeout"));
    assert!(e.starts_with("test.toml: "), "{e}");
    assert!(e.contains("conect_timeout"), "{e}");
}

#[test]
fn a_listener_naming_a_missing_upstream_is_an_error() {
    let e = error_of(&GOOD.replace("upstream = \"web\"", "upstream = \"nope\""));
    assert!(
        e.contains("upstream") && e.contains("\"nope\"") && e.contains("no [[upstream]]"),
        "{e}"
    );
}

#[test]
fn an_empty_backend_list_is_an_error() {
    let e = error_of(&GOOD.replace(
        r#"backends = ["10.0.0.1:80", "10.0.0.2:80", "backend.internal:8080"]"#,
        "backends = []",
    ));
    assert!(
        e.contains("backends") && e.contains("at least one backend"),
        "{e}"
    );
}

#[test]
fn bad_addresses_are_errors_naming_the_value() {
    for (from, to) in [
        ("\"10.0.0.1:80\"", "\"10.0.0.1\""),
        ("\"10.0.0.1:80\"", "\"10.0.0.1:99999\""),
        ("\"10.0.0.1:80\"", "\"bad host:80\""),
        ("\"10.0.0.1:80\"", "\"10.0.0.1:0\""),
        ("\"0.0.0.0:8443\"", "\"localhost:8443\""),
        ("\"127.0.0.1:9000\"", "\"127.0.0.1\""),
    ] {
        let e = error_of(&GOOD.replace(from, to));
        assert!(e.contains(to.trim_matches('"')), "{to}: {e}");
        assert!(e.contains("invalid value"), "{to}: {e}");
    }
}

#[test]
fn bad_durations_are_errors_naming_the_key_and_value() {
    for bad in ["\"3\"", "\"fast\"", "\"0s\"", "\"-1s\""] {
        let e = error_of(&GOOD.replace("\"250ms\"", bad));
        assert!(e.contains("connect_timeout"), "{bad}: {e}");
        assert!(e.contains(bad.trim_matches('"')), "{bad}: {e}");
    }
    let e = error_of(&GOOD.replace("drain_timeout = \"5s\"", "drain_timeout = 5"));
    assert!(e.contains("drain_timeout"), "{e}");
}

#[test]
fn duplicate_names_and_backends_are_errors() {
    let twice = format!("{GOOD}\n[[upstream]]\nname = \"web\"\nbackends = [\"10.0.0.9:1\"]\n");
    assert!(error_of(&twice).contains("duplicate upstream name"));
    let e = error_of(&GOOD.replace("\"10.0.0.2:80\"", "\"10.0.0.1:80\""));
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn a_config_without_listeners_is_an_error() {
    let e = error_of("[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n");
    assert!(e.contains("at least one [[listener]]"), "{e}");
}

#[test]
fn a_missing_file_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/fulcrum.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/fulcrum.toml"), "{e}");
}

#[test]
fn malformed_toml_is_an_error_not_a_panic() {
    for text in [
        "[[listener]",
        "listener = 5",
        "\u{0}",
        "[[listener]]\nname = 'a'\nbind = 1\n",
    ] {
        let _ = error_of(text);
    }
}

const TLS: &str = r#"
[[listener]]
name = "tls"
bind = "127.0.0.1:0"
upstream = "web"
handshake_timeout = "2s"
reject_response = "HTTP/1.1 429 Too Many Requests\r\n\r\n"
[listener.tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"
min_version = "1.3"
[listener.sni]
"Reports.Example.com" = "reports"
[listener.rate_limit]
capacity = 7

[[upstream]]
name = "web"
backends = ["127.0.0.1:1"]
[[upstream]]
name = "reports"
backends = ["127.0.0.1:2"]

[authorization]
alice = ["web"]
"spiffe://example.org/batch" = ["web", "reports"]

[rate_limit]
capacity = 100
window = "1s"
max_concurrent = 50
[rate_limit.clients]
batch-job = 1000
"#;

#[test]
fn tls_sni_authorization_and_rate_limit_keys_load_typed() {
    let config = Config::from_toml(TLS, "t").expect("valid");
    let l = &config.listeners[0];
    let tls = l.tls.as_ref().expect("tls");
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert_eq!(tls.client_ca.as_deref(), Some(Path::new("certs/ca.pem")));
    assert_eq!(
        l.sni,
        vec![("reports.example.com".to_string(), "reports".to_string())]
    );
    assert_eq!(l.handshake_timeout, Duration::from_secs(2));
    assert_eq!(
        l.reject_response.as_deref(),
        Some(&b"HTTP/1.1 429 Too Many Requests\r\n\r\n"[..])
    );
    assert_eq!(l.rate_limit.as_ref().map(|r| r.policy().capacity), Some(7));
    assert_eq!(config.authorization.entries.len(), 2);
    let r = config.rate_limit.expect("rate limit").policy;
    assert_eq!(
        (r.capacity, r.window, r.max_concurrent),
        (100, Duration::from_secs(1), Some(50))
    );
    assert_eq!(r.max_clients, DEFAULT_MAX_CLIENTS);
    assert_eq!(r.overrides.get("batch-job"), Some(&1000));
}

#[test]
fn tls_paths_are_resolved_against_the_config_files_directory() {
    let dir = std::env::temp_dir().join(format!("fulcrum-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fulcrum.toml");
    std::fs::write(&path, TLS).unwrap();
    let config = Config::load(&path);
    let _ = std::fs::remove_dir_all(&dir);
    let tls = config.expect("valid").listeners[0].tls.clone().expect("tls");
    assert_eq!(tls.cert, dir.join("certs/server.pem"));
}

#[test]
fn an_authorization_entry_naming_a_missing_upstream_is_an_error() {
    let e = error_of(&TLS.replace("alice = [\"web\"]", "alice = [\"web\", \"nope\"]"));
    assert!(
        e.contains("authorization.\"alice\"") && e.contains("\"nope\""),
        "{e}"
    );
}

#[test]
fn an_sni_entry_naming_a_missing_upstream_is_an_error() {
    let e = error_of(&TLS.replace(
        "= \"reports\"\n[listener.rate_limit]",
        "= \"nope\"\n[listener.rate_limit]",
    ));
    assert!(e.contains("sni") && e.contains("\"nope\""), "{e}");
}

#[test]
fn a_bad_min_version_is_an_error() {
    let e = error_of(&TLS.replace("min_version = \"1.3\"", "min_version = \"1.1\""));
    assert!(e.contains("min_version") && e.contains("1.1"), "{e}");
}

#[test]
fn sni_without_tls_is_an_error() {
    let text = GOOD.replace(
        "upstream = \"web\"\n\n[[upstream]]",
        "upstream = \"web\"\n[listener.sni]\n\"a\" = \"web\"\n\n[[upstream]]",
    );
    let e = error_of(&text);
    assert!(e.contains("SNI routing needs"), "{e}");
}

#[test]
fn a_listener_rate_limit_without_capacity_needs_a_global_rate_limit() {
    let text = GOOD.replace(
        "upstream = \"web\"\n\n[[upstream]]",
        "upstream = \"web\"\n[listener.rate_limit]\nwindow = \"1s\"\n\n[[upstream]]",
    );
    let e = error_of(&text);
    assert!(e.contains("rate_limit.capacity") && e.contains("required"), "{e}");
}

#[test]
fn a_zero_rate_limit_window_is_an_error() {
    let e = error_of(&TLS.replace("window = \"1s\"", "window = \"0s\""));
    assert!(e.contains("rate_limit.window"), "{e}");
}

const HEALTH: &str = r#"
[[listener]]
name = "web"
bind = "127.0.0.1:0"
upstream = "web"

[[upstream]]
name = "web"
backends = ["10.0.0.1:80"]

[upstream.health_check]
interval = "5s"
timeout = "500ms"
rise = 4
fall = 1
send = "PING\r\n"
expect = "+PONG\u0000"
on_down = "close"
slow_start = "30s"
"#;

#[test]
fn a_health_check_table_loads_with_typed_values_and_escaped_bytes() {
    let config = Config::from_toml(HEALTH, "test.toml").expect("valid config");
    let check = &config.upstreams[0].health_check;
    assert_eq!(
        *check,
        HealthCheckConfig {
            active: true,
            interval: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
            rise: 4,
            fall: 1,
            send: b"PING\r\n".to_vec(),
            expect: b"+PONG\0".to_vec(),
            on_down: OnDown::Close,
            slow_start: Some(Duration::from_secs(30)),
        }
    );
}

#[test]
fn without_a_health_check_table_passive_detection_uses_the_defaults() {
    let config = Config::from_toml(GOOD, "test.toml").expect("valid config");
    let check = &config.upstreams[0].health_check;
    assert!(!check.active);
    assert_eq!(
        (check.rise, check.fall),
        (DEFAULT_HEALTH_RISE, DEFAULT_HEALTH_FALL)
    );
    assert_eq!(check.on_down, OnDown::Keep);
}

#[test]
fn an_empty_health_check_table_turns_on_probes_with_the_defaults() {
    let text = HEALTH
        .split("interval")
        .next()
        .expect("text before interval")
        .to_string();
    let config = Config::from_toml(&text, "test.toml").expect("valid config");
    let check = &config.upstreams[0].health_check;
    assert_eq!(
        *check,
        HealthCheckConfig {
            active: true,
            ..HealthCheckConfig::default()
        }
    );
}

#[test]
fn a_short_interval_alone_caps_the_default_timeout() {
    let text = HEALTH.replace(
        "interval = \"5s\"\ntimeout = \"500ms\"\n",
        "interval = \"100ms\"\n",
    );
    let config = Config::from_toml(&text, "test.toml").expect("valid config");
    assert_eq!(
        config.upstreams[0].health_check.timeout,
        Duration::from_millis(100)
    );
}

#[test]
fn bad_health_check_values_are_errors_naming_the_key_and_value() {
    for (from, to, key, reason) in [
        ("rise = 4", "rise = 0", "health_check.rise", "at least 1"),
        ("fall = 1", "fall = 0", "health_check.fall", "at least 1"),
        ("\"5s\"", "\"0s\"", "health_check.interval", "greater than zero"),
        ("\"500ms\"", "\"soon\"", "health_check.timeout", "soon"),
        (
            "\"500ms\"",
            "\"6s\"",
            "health_check.timeout",
            "must not exceed interval (5s)",
        ),
        ("\"close\"", "\"drop\"", "health_check.on_down", "\"drop\""),
        (
            "\"30s\"",
            "\"0ms\"",
            "health_check.slow_start",
            "greater than zero",
        ),
        ("fall = 1", "fal = 1", "fal", "unknown field"),
    ] {
        let e = error_of(&HEALTH.replace(from, to));
        assert!(e.contains(key) && e.contains(reason), "{to}: {e}");
    }
}

#[test]
fn runtime_workers_is_optional_and_bounded() {
    let config = Config::from_toml(&format!("{GOOD}\n[runtime]\nworkers = 3\n"), "t").expect("valid");
    assert_eq!(config.workers(), 3);
    let default = Config::from_toml(GOOD, "t").expect("valid");
    assert!(default.workers.is_none() && default.workers() >= 1);
    for bad in ["0", "100000"] {
        let e = error_of(&format!("{GOOD}\n[runtime]\nworkers = {bad}\n"));
        assert!(e.contains("runtime.workers") && e.contains(bad), "{e}");
    }
}

#[test]
fn the_runtime_scheduler_is_shared_by_default_or_per_worker_and_nothing_else() {
    use crate::config::Scheduler;
    let with = |value: &str| Config::from_toml(&format!("{GOOD}\n[runtime]\nscheduler = {value}\n"), "t");
    assert_eq!(
        Config::from_toml(GOOD, "t").expect("valid").scheduler,
        Scheduler::Shared
    );
    assert_eq!(with("\"shared\"").expect("valid").scheduler, Scheduler::Shared);
    assert_eq!(
        with("\"per_worker\"").expect("valid").scheduler,
        Scheduler::PerWorker
    );
    let e = with("\"per-core\"").expect_err("unknown").to_string();
    assert!(e.contains("runtime.scheduler") && e.contains("per_worker"), "{e}");
}

#[test]
fn an_access_log_path_of_stdout_means_standard_output() {
    let text = format!("{GOOD}\n[access_log]\npath = \"stdout\"\n");
    let config = Config::from_toml(&text, "test.toml").expect("valid config");
    assert_eq!(config.access_log, Some(AccessLogConfig::Stdout));
}

#[test]
fn an_access_log_interim_is_a_duration_of_at_least_a_second_and_off_by_default() {
    let with = |interim: &str| {
        let text = format!("{GOOD}\n[access_log]\npath = \"stdout\"\ninterim = \"{interim}\"\n");
        Config::from_toml(&text, "test.toml").map(|c| c.access_log_interim)
    };
    assert_eq!(with("5m").expect("valid"), Some(Duration::from_secs(300)));
    assert_eq!(with("0s").expect("valid"), None);
    let error = with("500ms").expect_err("too short").to_string();
    assert!(
        error.contains("access_log.interim") && error.contains("at least 1s"),
        "{error}"
    );
    assert!(with("soon").is_err());
    assert_eq!(
        Config::from_toml(GOOD, "test.toml")
            .expect("valid")
            .access_log_interim,
        None
    );
}

#[test]
fn a_relative_access_log_path_is_resolved_against_the_config_files_directory() {
    let text = format!("{GOOD}\n[access_log]\npath = \"logs/access.jsonl\"\n");
    let config = Config::parse(&text, "etc/fulcrum.toml", Path::new("etc")).expect("valid config");
    assert_eq!(
        config.access_log,
        Some(AccessLogConfig::File(PathBuf::from("etc/logs/access.jsonl")))
    );
    assert_eq!(
        Config::from_toml(GOOD, "test.toml").expect("valid").access_log,
        None
    );
}

#[test]
fn an_unknown_or_empty_access_log_key_is_an_error() {
    let unknown = error_of(&format!(
        "{GOOD}\n[access_log]\npath = \"stdout\"\nformat = \"json\"\n"
    ));
    assert!(unknown.contains("format"), "{unknown}");
    let empty = error_of(&format!("{GOOD}\n[access_log]\npath = \"\"\n"));
    assert!(empty.contains("access_log.path"), "{empty}");
}

const SHARED_BASE: &str = "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n";

#[test]
fn a_shared_rate_limit_loads_typed_with_defaults() {
    let text = format!(
        "{SHARED_BASE}[rate_limit]\ncapacity = 20\nwindow = '1m'\n[rate_limit.shared]\nredis = 'redis://:secret@127.0.0.1:6379/2'\n"
    );
    let config = Config::from_toml(&text, "t").expect("valid");
    let shared = config.rate_limit.unwrap().shared.expect("shared");
    assert_eq!(shared.redis, "redis://:secret@127.0.0.1:6379/2");
    assert_eq!(shared.key_prefix, DEFAULT_SHARED_KEY_PREFIX);
    assert_eq!(shared.timeout, DEFAULT_SHARED_TIMEOUT);
    assert_eq!(shared.on_unavailable, OnUnavailable::Local);

    let text = format!(
        "{SHARED_BASE}[rate_limit]\ncapacity = 20\nwindow = '1m'\n[rate_limit.shared]\nredis = 'redis://127.0.0.1'\nkey_prefix = 'x:'\ntimeout = '20ms'\non_unavailable = 'deny'\n"
    );
    let shared = Config::from_toml(&text, "t")
        .unwrap()
        .rate_limit
        .unwrap()
        .shared
        .unwrap();
    assert_eq!(shared.key_prefix, "x:");
    assert_eq!(shared.timeout, Duration::from_millis(20));
    assert_eq!(shared.on_unavailable, OnUnavailable::Deny);
}

#[test]
fn bad_shared_rate_limits_are_refused_naming_the_key() {
    let head = format!("{SHARED_BASE}[rate_limit]\ncapacity = 20\nwindow = '1m'\n[rate_limit.shared]\n");
    for (body, key) in [
        ("redis = 'http://127.0.0.1'", "rate_limit.shared.redis"),
        ("redis = 'redis://'", "rate_limit.shared.redis"),
        (
            "redis = 'rediss://127.0.0.1/#insecure'",
            "rate_limit.shared.redis",
        ),
        (
            "redis = 'redis://127.0.0.1'\ntimeout = '0s'",
            "rate_limit.shared.timeout",
        ),
        (
            "redis = 'redis://127.0.0.1'\non_unavailable = 'maybe'",
            "rate_limit.shared.on_unavailable",
        ),
        ("redis = 'redis://127.0.0.1'\nretries = 3", "retries"),
        ("key_prefix = 'x'", "redis"),
    ] {
        let e = error_of(&format!("{head}{body}\n"));
        assert!(e.contains(key), "{body}: {e}");
    }
    let e = error_of(&format!(
        "{SHARED_BASE}[rate_limit.shared]\nredis = 'redis://127.0.0.1'\n"
    ));
    assert!(e.contains("needs [rate_limit]"), "{e}");
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("fulcrum-config-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `contents` to `name`, mode 0600 (secret files readable by others are refused).
    fn write(&self, name: &str, contents: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[rate_limit.shared]` with `body`, parsed as if the config file were in `base`.
fn shared_in(base: &Path, body: &str) -> Result<SharedRateLimitConfig, ConfigError> {
    let text =
        format!("{SHARED_BASE}[rate_limit]\ncapacity = 20\nwindow = '1m'\n[rate_limit.shared]\n{body}\n");
    let config = Config::parse(&text, "t.toml", base)?;
    Ok(config.rate_limit.and_then(|r| r.shared).expect("shared"))
}

fn shared_error(base: &Path, body: &str) -> String {
    match shared_in(base, body) {
        Ok(shared) => panic!("accepted but should not be: {body}\n{shared:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_rediss_url_is_accepted_and_without_a_tls_table_trusts_the_system_roots() {
    let shared = shared_in(Path::new(""), "redis = 'rediss://cache.internal:6380/1'").expect("valid");
    assert_eq!(shared.redis, "rediss://cache.internal:6380/1");
    assert_eq!(shared.tls, None);
    assert!(shared.password.is_none());
}

#[test]
fn a_rediss_url_that_skips_certificate_verification_is_refused() {
    let e = shared_error(Path::new(""), "redis = 'rediss://127.0.0.1:6380/#insecure'");
    assert!(
        e.contains("rate_limit.shared.redis") && e.contains("#insecure"),
        "{e}"
    );
}

#[test]
fn a_tls_table_loads_its_paths_resolved_against_the_config_files_directory() {
    let shared = shared_in(
        Path::new("etc"),
        "redis = 'rediss://127.0.0.1:6380'\n[rate_limit.shared.tls]\nca = 'redis-ca.pem'\ncert = '/abs/c.pem'\nkey = 'c.key'",
    )
    .expect("valid");
    let tls = shared.tls.expect("tls");
    assert_eq!(tls.ca, Some(PathBuf::from("etc/redis-ca.pem")));
    assert_eq!(
        tls.client_cert,
        Some((PathBuf::from("/abs/c.pem"), PathBuf::from("etc/c.key")))
    );
    let only_ca = shared_in(
        Path::new(""),
        "redis = 'rediss://127.0.0.1:6380'\n[rate_limit.shared.tls]\nca = 'ca.pem'",
    )
    .expect("valid");
    assert_eq!(only_ca.tls.expect("tls").client_cert, None);
}

#[test]
fn a_tls_table_with_a_plain_redis_url_is_refused() {
    let e = shared_error(
        Path::new(""),
        "redis = 'redis://127.0.0.1:6379'\n[rate_limit.shared.tls]\nca = 'ca.pem'",
    );
    assert!(
        e.contains("rate_limit.shared.tls") && e.contains("rediss://"),
        "{e}"
    );
}

#[test]
fn a_redis_client_certificate_without_its_key_or_a_key_without_its_certificate_is_refused() {
    for half in ["cert = 'c.pem'", "key = 'c.key'"] {
        let e = shared_error(
            Path::new(""),
            &format!("redis = 'rediss://127.0.0.1:6380'\n[rate_limit.shared.tls]\nca = 'ca.pem'\n{half}"),
        );
        assert!(
            e.contains("rate_limit.shared.tls") && e.contains("both cert and key"),
            "{half}: {e}"
        );
    }
}

#[test]
fn a_password_file_relative_to_the_config_directory_is_read_with_trailing_whitespace_trimmed() {
    let dir = TempDir::new("password");
    dir.write("redis.pass", "  s3cret pass \r\n\n");
    let shared = shared_in(
        &dir.0,
        "redis = 'rediss://fulcrum@127.0.0.1:6380/0'\npassword_file = 'redis.pass'",
    )
    .expect("valid");
    // Only trailing whitespace goes: leading and inner spaces may be part of a password.
    assert_eq!(
        shared.password.as_ref().map(Secret::expose),
        Some("  s3cret pass")
    );
    assert_eq!(shared.redis, "rediss://fulcrum@127.0.0.1:6380/0");
}

#[test]
fn a_password_in_both_the_url_and_a_password_file_is_refused() {
    let dir = TempDir::new("both");
    dir.write("redis.pass", "from-file\n");
    let e = shared_error(
        &dir.0,
        "redis = 'redis://user:from-url@127.0.0.1:6379'\npassword_file = 'redis.pass'",
    );
    assert!(
        e.contains("rate_limit.shared.password_file")
            && e.contains("give the password in the URL or in password_file, not both"),
        "{e}"
    );
    assert!(!e.contains("from-url") && !e.contains("from-file"), "{e}");
}

#[test]
fn an_empty_or_blank_password_file_is_refused() {
    let dir = TempDir::new("empty");
    for (name, contents) in [("empty.pass", ""), ("blank.pass", " \n\t\n")] {
        dir.write(name, contents);
        let e = shared_error(
            &dir.0,
            &format!("redis = 'redis://127.0.0.1:6379'\npassword_file = '{name}'"),
        );
        assert!(
            e.contains("rate_limit.shared.password_file") && e.contains(name) && e.contains("no password"),
            "{e}"
        );
    }
}

#[test]
fn a_missing_password_file_is_refused_naming_the_key_and_path() {
    let dir = TempDir::new("missing");
    let e = shared_error(
        &dir.0,
        "redis = 'redis://127.0.0.1:6379'\npassword_file = 'nope.pass'",
    );
    let path = dir.0.join("nope.pass");
    assert!(
        e.contains("rate_limit.shared.password_file")
            && e.contains(&path.display().to_string())
            && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn a_password_file_readable_by_group_or_others_is_refused_naming_it_and_its_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("readable-password");
    let path = dir.write("redis.pass", "hunter2\n");
    let body = "redis = 'redis://127.0.0.1:6379'\npassword_file = 'redis.pass'";
    for mode in [0o644, 0o604, 0o666] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = shared_error(&dir.0, body);
        assert!(
            e.contains("rate_limit.shared.password_file")
                && e.contains(&path.display().to_string())
                && e.contains(&format!(
                    "readable by group or others (mode {mode:04o}); chmod 600 it"
                )),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }
    for mode in [0o600, 0o400] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(shared_in(&dir.0, body).is_ok(), "mode {mode:04o} refused");
    }
}

#[test]
fn only_a_secret_file_owned_by_root_may_be_group_readable_and_none_may_be_readable_by_others() {
    let (root, user) = (0, 1000);
    for owner in [root, user] {
        for mode in [0o600, 0o400, 0o700, 0o620, 0o602] {
            assert!(!Validator::too_open(mode, owner), "{mode:04o} owned by {owner}");
        }
        for mode in [0o644, 0o604, 0o444, 0o666, 0o4604] {
            assert!(Validator::too_open(mode, owner), "{mode:04o} owned by {owner}");
        }
    }
    for mode in [0o640, 0o440, 0o660] {
        assert!(
            !Validator::too_open(mode, root),
            "{mode:04o} owned by root (a Kubernetes Secret)"
        );
        assert!(Validator::too_open(mode, user), "{mode:04o} owned by a user");
    }
}

#[test]
fn the_redis_password_is_redacted_in_error_text_and_debug_output() {
    // Errors that echo the URL echo it without its password.
    for body in [
        "redis = 'http://user:hunter2@127.0.0.1:6379'",
        "redis = 'rediss://:hunter2@127.0.0.1:6379/#insecure'",
        "redis = 'redis://:hunter2@127.0.0.1:6379'\n[rate_limit.shared.tls]\nca = 'ca.pem'",
    ] {
        let e = shared_error(Path::new(""), body);
        assert!(!e.contains("hunter2") && e.contains(":***@127.0.0.1"), "{e}");
    }
    // Debug shows neither the URL's password nor the file's.
    let with_url = shared_in(Path::new(""), "redis = 'redis://app:hunter2@127.0.0.1:6379/0'").expect("valid");
    let debug = format!("{with_url:?}");
    assert!(
        !debug.contains("hunter2") && debug.contains("redis://app:***@127.0.0.1:6379/0"),
        "{debug}"
    );
    let dir = TempDir::new("debug");
    dir.write("redis.pass", "hunter2\n");
    let with_file = shared_in(
        &dir.0,
        "redis = 'redis://127.0.0.1:6379'\npassword_file = 'redis.pass'",
    )
    .expect("valid");
    let debug = format!("{with_file:?}");
    assert!(
        !debug.contains("hunter2") && debug.contains("<redacted>"),
        "{debug}"
    );
}

#[test]
fn redacting_a_url_replaces_the_password_and_nothing_else() {
    for (url, shown) in [
        ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
        ("rediss://:p@h", "rediss://:***@h"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),
        // A password may hold / ? #: the user information ends at the last @ ...
        ("redis://u:pa/ss?#@h:1/0", "redis://u:***@h:1/0"),
        // ... so an @ after the host redacts more than needed, never less.
        ("redis://u:p@h/0?x=a@b", "redis://u:***@b"),
        ("redis://u@h:1", "redis://u@h:1"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("u:p@h", "u:***@h"),
        ("not a url", "not a url"),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}

#[test]
fn tls_revocation_resumption_and_identity_keys_load_typed_with_defaults() {
    let base = "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert='s.pem'\nkey='s.key'\nclient_ca='ca.pem'\n";
    let tail = "[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n";
    let defaults = Config::from_toml(&format!("{base}{tail}"), "t").expect("valid");
    let tls = defaults.listeners[0].tls.clone().expect("tls");
    assert_eq!(tls.crl, None);
    assert!(tls.close_on_expiry && tls.identity_from_cn);
    assert_eq!(
        (tls.session_cache, tls.session_timeout),
        (DEFAULT_SESSION_CACHE, DEFAULT_SESSION_TIMEOUT)
    );
    assert_eq!(defaults.reload, ReloadConfig::default());

    let text = format!(
        "{base}crl='ca.crl'\nclose_on_expiry=false\nidentity_from_cn=false\nsession_cache=0\nsession_timeout='1m'\n{tail}[reload]\nwatch=true\ndebounce='250ms'\n"
    );
    let config = Config::from_toml(&text, "t").expect("valid");
    let tls = config.listeners[0].tls.clone().expect("tls");
    assert_eq!(tls.crl.as_deref(), Some(Path::new("ca.crl")));
    assert!(!tls.close_on_expiry && !tls.identity_from_cn);
    assert_eq!(
        (tls.session_cache, tls.session_timeout),
        (0, Duration::from_secs(60))
    );
    assert_eq!(
        config.reload,
        ReloadConfig {
            watch: true,
            debounce: Duration::from_millis(250)
        }
    );
}

#[test]
fn client_authentication_keys_without_client_ca_are_refused() {
    for key in [
        "crl = 'ca.crl'",
        "close_on_expiry = false",
        "identity_from_cn = false",
    ] {
        let text = format!(
            "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert='s.pem'\nkey='s.key'\n{key}\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n"
        );
        let e = Config::from_toml(&text, "t").expect_err(key).to_string();
        let name = key.split(' ').next().unwrap();
        assert!(
            e.contains(&format!("tls.{name}")) && e.contains("needs client_ca"),
            "{e}"
        );
    }
}

#[test]
fn files_lists_the_config_file_and_every_file_it_names_once() {
    let dir = TempDir::new("files");
    dir.write("redis.pass", "secret\n");
    let path = dir.write(
        "fulcrum.toml",
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert='s.pem'\nkey='s.key'\nclient_ca='ca.pem'\ncrl='ca.crl'\n\
         [listener.tls.trust_domains]\n'prod.example'='prod.pem'\n\
         [[listener]]\nname='b'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert='s.pem'\nkey='s.key'\n\
         [[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[upstream.tls]\nca='backend-ca.pem'\n\
         [rate_limit]\ncapacity=1\nwindow='1s'\n[rate_limit.shared]\nredis='redis://127.0.0.1'\npassword_file='redis.pass'\n",
    );
    let config = Config::load(&path).expect("valid");
    let names: Vec<String> = config
        .files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "fulcrum.toml",
            "s.pem",
            "s.key",
            "ca.pem",
            "ca.crl",
            "prod.pem",
            "backend-ca.pem",
            "redis.pass"
        ]
    );
}

const ONE: &str = "[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n";

fn listener(keys: &str) -> Result<Config, ConfigError> {
    Config::from_toml(
        &format!("[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n{keys}\n{ONE}"),
        "t",
    )
}

#[test]
fn connection_bounds_default_to_an_hour_of_idle_keepalive_on_and_no_lifetime() {
    let config = listener("").expect("valid");
    let l = &config.listeners[0];
    assert_eq!(
        (l.idle_timeout, l.half_closed_timeout),
        (Some(DEFAULT_IDLE_TIMEOUT), Some(DEFAULT_IDLE_TIMEOUT))
    );
    assert_eq!((l.max_lifetime, l.max_lifetime_jitter), (None, Duration::ZERO));
    assert_eq!(l.tcp_keepalive, Some(Keepalive::default()));
    assert_eq!(config.upstreams[0].tcp_keepalive, Some(Keepalive::default()));
    assert_eq!((l.max_connections, config.max_connections), (None, None));
    assert_eq!(l.max_handshakes_per_source, DEFAULT_MAX_HANDSHAKES_PER_SOURCE);
    assert_eq!(config.source_prefixes, SourcePrefixes { ipv4: 32, ipv6: 64 });
    assert_eq!(Keepalive::default().user_timeout(), Duration::from_secs(120));
}

#[test]
fn connection_bounds_load_typed_and_zero_turns_a_timeout_off() {
    let config = listener(
        "idle_timeout = '0s'\nhalf_closed_timeout = '30s'\nmax_lifetime = '1h'\nmax_connections = 9\n\
         max_handshakes_per_source = 4\ntcp_keepalive = { idle = '30s', count = 2 }\n",
    )
    .expect("valid");
    let l = &config.listeners[0];
    assert_eq!(
        (l.idle_timeout, l.half_closed_timeout),
        (None, Some(Duration::from_secs(30)))
    );
    assert_eq!(
        (l.max_lifetime, l.max_lifetime_jitter),
        (Some(Duration::from_secs(3600)), Duration::from_secs(360))
    );
    assert_eq!((l.max_connections, l.max_handshakes_per_source), (Some(9), 4));
    let keepalive = l.tcp_keepalive.expect("on");
    assert_eq!(
        (keepalive.idle, keepalive.interval, keepalive.count),
        (Duration::from_secs(30), Duration::from_secs(10), 2)
    );
    assert_eq!(
        listener("tcp_keepalive = false").expect("valid").listeners[0].tcp_keepalive,
        None
    );
}

#[test]
fn bad_connection_bounds_are_refused_naming_the_key() {
    for (keys, key, why) in [
        (
            "max_lifetime = '1h'\nmax_lifetime_jitter = '31m'",
            "max_lifetime_jitter",
            "at most half",
        ),
        (
            "max_lifetime_jitter = '1m'",
            "max_lifetime_jitter",
            "needs max_lifetime",
        ),
        ("max_connections = 0", "max_connections", "at least 1"),
        (
            "max_handshakes_per_source = 0",
            "max_handshakes_per_source",
            "at least 1",
        ),
        (
            "trusted_proxies = ['10.0.0.0/8']",
            "trusted_proxies",
            "accept_proxy_protocol",
        ),
        (
            "accept_proxy_protocol = true\ntrusted_proxies = ['10.0.0.0/33']",
            "trusted_proxies",
            "0 to 32",
        ),
        ("idle_timeout = 'soon'", "idle_timeout", "expected"),
        ("tcp_keepalive = { count = 0 }", "tcp_keepalive.count", "1 to 127"),
        (
            "tcp_keepalive = { count = 128 }",
            "tcp_keepalive.count",
            "1 to 127",
        ),
        (
            "tcp_keepalive = { idle = '500ms' }",
            "tcp_keepalive.idle",
            "1s to 32767s",
        ),
        (
            "tcp_keepalive = { interval = '10h' }",
            "tcp_keepalive.interval",
            "1s to 32767s",
        ),
    ] {
        let e = listener(keys).expect_err(keys).to_string();
        assert!(e.contains(key) && e.contains(why), "{keys}: {e}");
    }
    let e = Config::from_toml(
        &format!("max_connections = 0\n[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n{ONE}"),
        "t",
    )
    .expect_err("zero")
    .to_string();
    assert!(e.contains("max_connections"), "{e}");
    let e = listener("[rate_limit]\ncapacity = 1\nwindow = '1s'\nipv6_prefix = 129")
        .expect_err("prefix")
        .to_string();
    assert!(
        e.contains("rate_limit.ipv6_prefix") && e.contains("1 to 128"),
        "{e}"
    );
}

#[test]
fn source_prefixes_mask_addresses_and_trusted_proxies_match_networks() {
    let prefixes = SourcePrefixes { ipv4: 24, ipv6: 64 };
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(prefixes.mask(ip("192.0.2.77")), ip("192.0.2.0"));
    assert_eq!(prefixes.mask(ip("::ffff:192.0.2.77")), ip("192.0.2.0"));
    assert_eq!(prefixes.mask(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    assert_eq!(SourcePrefixes::default().mask(ip("192.0.2.77")), ip("192.0.2.77"));
    let net = IpNet::parse("10.0.0.0/8").unwrap();
    assert!(net.contains(ip("10.200.3.4")) && net.contains(ip("::ffff:10.0.0.1")));
    assert!(!net.contains(ip("11.0.0.1")) && !net.contains(ip("::1")));
    let host = IpNet::parse("::1").unwrap();
    assert_eq!(host.prefix, 128);
    assert!(host.contains(ip("::1")) && !host.contains(ip("::2")));
    assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
    assert!(IpNet::parse("10.0.0.0/x").is_err() && IpNet::parse("ten").is_err());
}

#[test]
fn a_toml_syntax_error_on_a_line_with_a_secret_does_not_quote_it() {
    let text = "[rate_limit]\ncapacity = 1\nwindow = '1s'\n[rate_limit.shared]\nredis = \"redis://:hunter2@127.0.0.1\n";
    let e = Config::from_toml(text, "t")
        .expect_err("unterminated string")
        .to_string();
    assert!(!e.contains("hunter2"), "{e}");
    assert!(e.contains("line 5") && e.contains("not shown"), "{e}");
    // Without a secret on the line, toml's own message with the line stays.
    let e = Config::from_toml("drain_timeout = 30s\n", "t")
        .expect_err("bare word")
        .to_string();
    assert!(e.contains("drain_timeout = 30s"), "{e}");
}

#[test]
fn an_unparsable_redis_url_is_echoed_without_its_password() {
    let text = format!("{SHARED_BASE}[rate_limit]\ncapacity = 1\nwindow = '1s'\n[rate_limit.shared]\nredis = 'redis://user:se/cr?et@exa mple:99999'\n");
    let e = Config::from_toml(&text, "t").expect_err("bad URL").to_string();
    assert!(!e.contains("se/cr") && !e.contains("et@"), "{e}");
    assert!(e.contains("***"), "{e}");
}

#[test]
fn alpn_keys_load_and_bad_ones_are_refused_naming_the_key() {
    let tls = "[listener.tls]\ncert='s.pem'\nkey='s.key'\n";
    let config = listener(&format!(
        "{tls}alpn = ['h2', 'http/1.1']\nalpn_required = true\n[listener.alpn]\n'h2' = 'u'\n"
    ))
    .expect("valid");
    let l = &config.listeners[0];
    let t = l.tls.as_ref().expect("tls");
    assert_eq!(
        (t.alpn.clone(), t.alpn_required),
        (vec!["h2".to_string(), "http/1.1".to_string()], true)
    );
    assert_eq!(l.alpn_routes, vec![("h2".to_string(), "u".to_string())]);
    for (keys, key, why) in [
        ("alpn_required = true\n", "alpn_required", "needs alpn"),
        ("alpn = ['h2', 'h2']\n", "alpn", "twice"),
        ("alpn = ['']\n", "alpn", "1 to 255"),
        (
            "alpn = ['h2']\n[listener.alpn]\n'http/1.1' = 'u'\n",
            "alpn.\"http/1.1\"",
            "does not offer",
        ),
        (
            "alpn = ['h2']\n[listener.alpn]\n'h2' = 'nope'\n",
            "alpn.\"h2\"",
            "no [[upstream]]",
        ),
    ] {
        let e = listener(&format!("{tls}{keys}")).expect_err(keys).to_string();
        assert!(e.contains(key) && e.contains(why), "{keys}: {e}");
    }
    let upstream = |alpn: &str| {
        Config::from_toml(
            &format!("[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[upstream.tls]\nca='ca.pem'\nalpn = {alpn}\n"),
            "t",
        )
    };
    let tls_of = |c: Config| c.upstreams[0].tls.clone().expect("tls").alpn;
    assert_eq!(tls_of(upstream("'client'").expect("valid")), UpstreamAlpn::Client);
    assert_eq!(
        tls_of(upstream("['h2']").expect("valid")),
        UpstreamAlpn::Fixed(vec!["h2".into()])
    );
    let e = upstream("'server'").expect_err("bad word").to_string();
    assert!(e.contains("tls.alpn") && e.contains("client"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Backend tables, the queue and discovery

const LIST: &str = r#"backends = ["10.0.0.1:80", "10.0.0.2:80", "backend.internal:8080"]"#;

fn with_backends(backends: &str) -> String {
    GOOD.replace(LIST, backends)
}

#[test]
fn backends_mix_strings_and_tables_with_weight_cap_and_backup() {
    let text = with_backends(
        r#"backends = ["10.0.0.1:80", { addr = "10.0.0.2:80", weight = 3, max_connections = 200 }, { addr = "10.0.9.1:80", backup = true }]
queue_size = 50
queue_timeout = "2s""#,
    );
    let config = Config::from_toml(&text, "test.toml").expect("valid config");
    let upstream = config.upstream("web").expect("upstream web");
    let plain = BackendConfig::new(BackendAddr::Ip("10.0.0.1:80".parse().unwrap()));
    assert_eq!(upstream.backends[0], plain);
    assert_eq!(
        upstream.backends[1],
        BackendConfig {
            addr: BackendAddr::Ip("10.0.0.2:80".parse().unwrap()),
            weight: 3,
            max_connections: Some(200),
            backup: false,
        }
    );
    assert!(upstream.backends[2].backup && upstream.backends[2].weight == 1);
    assert_eq!(
        (upstream.queue_size, upstream.queue_timeout),
        (50, Duration::from_secs(2))
    );
}

#[test]
fn the_queue_is_off_by_default_with_a_five_second_timeout() {
    let config = Config::from_toml(GOOD, "test.toml").expect("valid config");
    let upstream = config.upstream("web").expect("upstream web");
    assert_eq!(
        (upstream.queue_size, upstream.queue_timeout),
        (0, DEFAULT_QUEUE_TIMEOUT)
    );
    assert!(upstream.discover.is_none());
}

#[test]
fn weights_outside_1_to_256_and_a_zero_cap_are_errors_naming_the_backend() {
    for (table, key) in [
        (r#"{ addr = "10.0.0.2:80", weight = 0 }"#, "weight"),
        (r#"{ addr = "10.0.0.2:80", weight = 257 }"#, "weight"),
        (
            r#"{ addr = "10.0.0.2:80", max_connections = 0 }"#,
            "max_connections",
        ),
    ] {
        let e = error_of(&with_backends(&format!(r#"backends = ["10.0.0.1:80", {table}]"#)));
        assert!(e.contains("\"10.0.0.2:80\"") && e.contains(key), "{table}: {e}");
    }
    // The bounds themselves are fine.
    let text = with_backends(
        r#"backends = [{ addr = "10.0.0.1:80", weight = 1 }, { addr = "10.0.0.2:80", weight = 256 }]"#,
    );
    assert!(Config::from_toml(&text, "test.toml").is_ok());
}

#[test]
fn a_mistyped_key_in_a_backend_table_is_an_error_naming_it() {
    let e = error_of(&with_backends(
        r#"backends = [{ addr = "10.0.0.1:80", wieght = 2 }]"#,
    ));
    assert!(e.contains("wieght"), "{e}");
}

#[test]
fn an_upstream_of_only_backups_is_an_error() {
    let e = error_of(&with_backends(
        r#"backends = [{ addr = "10.0.0.1:80", backup = true }]"#,
    ));
    assert!(e.contains("backup") && e.contains("primary"), "{e}");
}

#[test]
fn a_backend_listed_twice_in_either_form_is_an_error() {
    let e = error_of(&with_backends(
        r#"backends = ["10.0.0.1:80", { addr = "10.0.0.1:80", weight = 2 }]"#,
    ));
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn discover_loads_with_its_interval_and_dns_servers() {
    let text = with_backends(
        r#"discover = "app.internal:8080"
discover_interval = "3s""#,
    ) + "\n[dns]\nservers = [\"10.96.0.10:53\", \"10.96.0.11\"]\n";
    let config = Config::from_toml(&text, "test.toml").expect("valid config");
    let upstream = config.upstream("web").expect("upstream web");
    let discover = upstream.discover.as_ref().expect("discover");
    assert_eq!((discover.host.as_str(), discover.port), ("app.internal", 8080));
    assert_eq!(discover.interval, Duration::from_secs(3));
    assert!(upstream.backends.is_empty());
    let servers: Vec<SocketAddr> = vec!["10.96.0.10:53".parse().unwrap(), "10.96.0.11:53".parse().unwrap()];
    assert_eq!(config.dns.servers, servers);
    let default = with_backends(r#"discover = "app.internal:8080""#);
    let config = Config::from_toml(&default, "test.toml").expect("valid config");
    let interval = config
        .upstream("web")
        .and_then(|u| u.discover.as_ref())
        .map(|d| d.interval);
    assert_eq!(interval, Some(DEFAULT_DISCOVER_INTERVAL));
}

#[test]
fn backends_and_discover_together_or_neither_are_errors() {
    let both = GOOD.replace(LIST, &format!("{LIST}\ndiscover = \"app.internal:8080\""));
    assert!(error_of(&both).contains("either backends or discover"));
    let neither = with_backends("");
    assert!(error_of(&neither).contains("backends = [...] or discover"));
}

#[test]
fn discover_needs_a_name_and_port_and_its_interval_needs_discover() {
    let e = error_of(&with_backends(r#"discover = "10.0.0.1:80""#));
    assert!(e.contains("expected a name"), "{e}");
    let e = error_of(&with_backends(r#"discover = "app.internal""#));
    assert!(e.contains("host:port"), "{e}");
    let e = error_of(&GOOD.replace(LIST, &format!("{LIST}\ndiscover_interval = \"5s\"")));
    assert!(
        e.contains("discover_interval") && e.contains("only means something with discover"),
        "{e}"
    );
    let e = error_of(
        &(with_backends(r#"discover = "app.internal:80""#) + "\n[dns]\nservers = [\"not-an-address\"]\n"),
    );
    assert!(e.contains("dns.servers"), "{e}");
}

#[test]
fn discover_max_backends_defaults_to_256_must_be_at_least_1_and_needs_discover() {
    let max = |text: &str| {
        let config = Config::from_toml(text, "test.toml").expect("valid config");
        config
            .upstream("web")
            .and_then(|u| u.discover.as_ref())
            .map(|d| d.max_backends)
    };
    let discover = |keys: &str| with_backends(&format!("discover = \"app.internal:8080\"\n{keys}"));
    assert_eq!(max(&discover("")), Some(DEFAULT_DISCOVER_MAX_BACKENDS));
    assert_eq!(DEFAULT_DISCOVER_MAX_BACKENDS, 256);
    assert_eq!(max(&discover("discover_max_backends = 10")), Some(10));
    let e = error_of(&discover("discover_max_backends = 0"));
    assert!(
        e.contains("discover_max_backends") && e.contains("at least 1"),
        "{e}"
    );
    let e = error_of(&GOOD.replace(LIST, &format!("{LIST}\ndiscover_max_backends = 5")));
    assert!(
        e.contains("discover_max_backends") && e.contains("only means something with discover"),
        "{e}"
    );
}

/// A listener with mTLS by `tls_keys` (in its `[listener.tls]`), then `rest`.
fn mtls_listener(tls_keys: &str, rest: &str) -> Result<Config, ConfigError> {
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[listener.tls]\ncert='s.pem'\nkey='s.key'\n{tls_keys}\n{rest}\n{ONE}"
    );
    Config::from_toml(&text, "t")
}

#[test]
fn trust_domains_take_spiffe_trust_domain_names_and_make_client_ca_optional() {
    let config =
        mtls_listener("[listener.tls.trust_domains]\n'prod.example'='prod.pem'\n", "").expect("valid");
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert!(tls.client_ca.is_none());
    assert_eq!(tls.trust_domains.keys().collect::<Vec<_>>(), ["prod.example"]);
    // mTLS settings are accepted beside trust_domains alone.
    mtls_listener("crl='x.crl'\n[listener.tls.trust_domains]\n'prod'='p.pem'\n", "")
        .expect("crl with trust domains");
    for bad in ["'spiffe://prod'", "'Prod'", "'prod/x'", "''"] {
        let e = mtls_listener(&format!("[listener.tls.trust_domains]\n{bad}='p.pem'\n"), "")
            .expect_err(bad)
            .to_string();
        assert!(
            e.contains("tls.trust_domains") && e.contains("trust domain name"),
            "{e}"
        );
    }
}

#[test]
fn a_listeners_own_authorization_must_name_known_upstreams_and_needs_client_certificates() {
    let own = "[listener.authorization]\nalice=['u']\n";
    let config = mtls_listener("client_ca='ca.pem'\n", own).expect("valid");
    assert_eq!(
        config.listeners[0].authorization,
        Some(crate::authz::Policy::exact([("alice", ["u"])]))
    );
    let e = mtls_listener(
        "client_ca='ca.pem'\n",
        "[listener.authorization]\nalice=['nope']\n",
    )
    .expect_err("unknown upstream")
    .to_string();
    assert!(e.contains("authorization") && e.contains("nope"), "{e}");
    let e = mtls_listener("", own)
        .expect_err("no client certificates")
        .to_string();
    assert!(
        e.contains("authorization") && e.contains("needs client certificates"),
        "{e}"
    );
}

#[test]
fn a_duration_above_ten_years_is_refused_for_every_key_and_keepalive_arithmetic_saturates() {
    for key in ["handshake_timeout", "idle_timeout", "max_lifetime"] {
        let e = listener(&format!("{key} = '400000000000y'\n"))
            .expect_err(key)
            .to_string();
        assert!(e.contains(key) && e.contains("at most 10 years"), "{e}");
        let e = listener(&format!("{key} = '3651d'\n"))
            .expect_err(key)
            .to_string();
        assert!(e.contains("at most 10 years"), "{e}");
        listener(&format!("{key} = '3650d'\n")).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    let e = listener("tcp_keepalive = { idle = '3651d' }\n")
        .expect_err("keepalive idle")
        .to_string();
    assert!(e.contains("at most 10 years"), "{e}");
    let huge = Keepalive {
        idle: MAX_DURATION,
        interval: Duration::MAX,
        count: 2,
    };
    assert_eq!(huge.user_timeout(), Duration::MAX);
}

#[test]
fn proxy_protocol_without_trusted_proxies_is_refused_naming_the_key() {
    let e = listener("accept_proxy_protocol = true\n")
        .expect_err("no trusted_proxies")
        .to_string();
    assert!(
        e.contains("accept_proxy_protocol") && e.contains("needs trusted_proxies"),
        "{e}"
    );
    let any = listener("accept_proxy_protocol = true\ntrusted_proxies = ['0.0.0.0/0', '::/0']\n")
        .expect("explicit");
    assert_eq!(any.listeners[0].trusted_proxies.len(), 2);
}
