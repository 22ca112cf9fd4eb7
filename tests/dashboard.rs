//! The Grafana dashboard (`deploy/grafana/fulcrum.json`) and the metrics table of
//! `docs/operations.md` against what `/metrics` really exports: the dashboard is valid JSON, every
//! query names at least one metric and only metrics fulcrum exports, and the operations page lists
//! every exported family.

use std::collections::BTreeSet;

mod common;

use common::TestServer;

const DASHBOARD: &str = include_str!("../deploy/grafana/fulcrum.json");
const OPERATIONS: &str = include_str!("../docs/operations.md");

/// The families `/metrics` declares (`# TYPE` lines, classic text) and which are histograms.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    let toml = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
                [[upstream]]\nname = \"web\"\nbackends = [\"127.0.0.1:9\"]\n";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime.block_on(TestServer::start(toml));
    let text = fulcrum::admin::prometheus::render(&server.state);
    let mut families = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            families.insert(name.to_string());
            if kind == "histogram" {
                histograms.insert(name.to_string());
            }
        }
    }
    (families, histograms)
}

/// Every `expr` string anywhere in the dashboard.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `fulcrum_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("fulcrum_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_dashboard_query_names_only_metrics_fulcrum_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "fulcrum");
    let (families, histograms) = exported();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let mut used = BTreeSet::new();
    for expr in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "a query names no fulcrum metric: {expr}");
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| histograms.contains(*base))
                })
                .unwrap_or(&name)
                .to_string();
            assert!(
                families.contains(&family),
                "{name} (in {expr}) is not exported; exported: {families:?}"
            );
            used.insert(family);
        }
    }
    for needed in [
        "fulcrum_connections_total",
        "fulcrum_connections_rejected_total",
        "fulcrum_tls_handshake_duration_seconds",
        "fulcrum_backend_connect_duration_seconds",
        "fulcrum_bytes_total",
        "fulcrum_backend_up",
        "fulcrum_certificate_not_after_timestamp_seconds",
    ] {
        assert!(used.contains(needed), "the dashboard shows nothing of {needed}");
    }
}

#[test]
fn the_operations_page_lists_every_exported_metric_family() {
    let (families, _) = exported();
    assert!(families.len() >= 25, "{families:?}");
    let missing: Vec<_> = families
        .iter()
        .filter(|f| !OPERATIONS.contains(&format!("`{f}`")))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
}

#[test]
fn a_misspelt_metric_is_caught() {
    let (families, _) = exported();
    assert!(!families.contains("fulcrum_connection_total"));
    assert_eq!(
        metric_names("sum(rate(fulcrum_bytes_total{x=\"y\"}[5m])) / fulcrum_backend_up"),
        ["fulcrum_bytes_total", "fulcrum_backend_up"]
    );
}
