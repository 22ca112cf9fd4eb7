use super::*;
use crate::config::Config;

fn admin(extra: &str) -> AdminConfig {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fulcrum-guard-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin.token"), "s3cret-token\n").unwrap();
    // A token file readable by group or others is refused.
    std::fs::set_permissions(
        dir.join("admin.token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let text = format!(
        "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['127.0.0.1:1']\n[admin]\n{extra}\n"
    );
    let path = dir.join("fulcrum.toml");
    std::fs::write(&path, text).unwrap();
    let admin = Config::load(&path).expect("valid").admin.expect("admin");
    let _ = std::fs::remove_dir_all(&dir);
    admin
}

fn get(path: &'static str) -> Request<'static> {
    Request {
        method: "GET",
        path,
        host: Some("127.0.0.1:9000"),
        ..Request::default()
    }
}

fn post(path: &'static str) -> Request<'static> {
    Request {
        method: "POST",
        content_type: Some("application/json"),
        ..get(path)
    }
}

#[test]
fn with_a_token_protected_endpoints_need_it_and_healthz_does_not() {
    let admin = admin("bind='127.0.0.1:0'\ntoken_file='admin.token'");
    for path in ["/", "/status", "/reload", "/upstreams/u/backends/b/state"] {
        let request = if path.starts_with("/up") || path == "/reload" {
            post(path)
        } else {
            get(path)
        };
        assert!(
            matches!(check(&admin, Via::Tcp, &request), Verdict::Unauthorized(_)),
            "{path} without"
        );
        let wrong = Request {
            authorization: Some("Bearer s3cret-tokem"),
            ..request
        };
        assert!(
            matches!(check(&admin, Via::Tcp, &wrong), Verdict::Unauthorized(_)),
            "{path} wrong"
        );
        let right = Request {
            authorization: Some("Bearer s3cret-token"),
            ..request
        };
        assert_eq!(
            check(&admin, Via::Tcp, &right),
            Verdict::Allow(Who::Token),
            "{path} right"
        );
    }
    assert_eq!(
        check(&admin, Via::Tcp, &get("/healthz")),
        Verdict::Allow(Who::Anyone)
    );
    assert_eq!(
        check(&admin, Via::Tcp, &get("/metrics")),
        Verdict::Allow(Who::Anyone)
    );
    // A browser: HTTP Basic with the token as the password.
    let basic = Request {
        authorization: Some("Basic b3BlcmF0b3I6czNjcmV0LXRva2Vu"),
        ..get("/")
    };
    assert_eq!(check(&admin, Via::Tcp, &basic), Verdict::Allow(Who::Token));
}

#[test]
fn metrics_auth_puts_metrics_behind_the_token() {
    let admin = admin("bind='127.0.0.1:0'\ntoken_file='admin.token'\nmetrics_auth=true");
    assert!(matches!(
        check(&admin, Via::Tcp, &get("/metrics")),
        Verdict::Unauthorized(_)
    ));
    let right = Request {
        authorization: Some("Bearer s3cret-token"),
        ..get("/metrics")
    };
    assert_eq!(check(&admin, Via::Tcp, &right), Verdict::Allow(Who::Token));
}

#[test]
fn foreign_origins_rebinding_hosts_and_form_posts_are_forbidden() {
    let admin = admin("bind='127.0.0.1:0'\nallowed_hosts=['fulcrum.internal']");
    let foreign = Request {
        origin: Some("http://evil.example"),
        ..post("/reload")
    };
    assert!(matches!(check(&admin, Via::Tcp, &foreign), Verdict::Forbidden(_)));
    let rebound = Request {
        host: Some("evil.example:9000"),
        ..get("/status")
    };
    assert!(matches!(check(&admin, Via::Tcp, &rebound), Verdict::Forbidden(_)));
    let form = Request {
        content_type: Some("application/x-www-form-urlencoded"),
        ..post("/reload")
    };
    assert!(matches!(check(&admin, Via::Tcp, &form), Verdict::Forbidden(_)));
    let no_type = Request {
        content_type: None,
        ..post("/reload")
    };
    assert!(matches!(check(&admin, Via::Tcp, &no_type), Verdict::Forbidden(_)));
    // Its own origin, an allowed name, localhost and IP literals are fine.
    let own = Request {
        origin: Some("http://127.0.0.1:9000"),
        ..post("/reload")
    };
    assert_eq!(check(&admin, Via::Tcp, &own), Verdict::Allow(Who::Anyone));
    for host in ["fulcrum.internal:9000", "localhost", "[::1]:9000", "10.1.2.3"] {
        let request = Request {
            host: Some(host),
            ..get("/status")
        };
        assert_eq!(
            check(&admin, Via::Tcp, &request),
            Verdict::Allow(Who::Anyone),
            "{host}"
        );
    }
}

#[test]
fn on_a_non_loopback_address_without_a_token_mutations_are_forbidden() {
    let admin = admin("bind='0.0.0.0:9000'");
    assert!(matches!(
        check(&admin, Via::Tcp, &post("/reload")),
        Verdict::Forbidden(_)
    ));
    assert_eq!(
        check(&admin, Via::Tcp, &get("/status")),
        Verdict::Allow(Who::Anyone)
    );
    let tokened = admin_with_token_exposed();
    let right = Request {
        authorization: Some("Bearer s3cret-token"),
        ..post("/reload")
    };
    assert_eq!(check(&tokened, Via::Tcp, &right), Verdict::Allow(Who::Token));
}

fn admin_with_token_exposed() -> AdminConfig {
    admin("bind='0.0.0.0:9000'\ntoken_file='admin.token'")
}

#[test]
fn through_the_unix_socket_the_file_permissions_are_the_authentication() {
    let admin = admin("socket='admin.sock'\ntoken_file='admin.token'");
    let request = Request {
        host: Some("evil.example"),
        ..post("/reload")
    };
    assert_eq!(check(&admin, Via::Socket, &request), Verdict::Allow(Who::Socket));
    let form = Request {
        content_type: Some("text/plain"),
        ..request
    };
    assert!(matches!(check(&admin, Via::Socket, &form), Verdict::Forbidden(_)));
}
