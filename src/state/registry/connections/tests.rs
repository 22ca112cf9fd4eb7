use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// A record with fixed facts, as the connection room's would show them.
struct Fake {
    id: u64,
    listener: &'static str,
    identity: Option<&'static str>,
    serial: Option<&'static str>,
    backend: Option<&'static str>,
    cut: CutSignal,
}

impl OpenConnection for Fake {
    fn id(&self) -> u64 {
        self.id
    }

    fn seen(&self) -> Seen<'_> {
        Seen {
            listener: self.listener,
            identity: self.identity,
            serial: self.serial,
            backend: self.backend,
        }
    }

    fn view(&self, _now: Instant) -> ConnectionView {
        ConnectionView {
            id: self.id,
            listener: self.listener.into(),
            client: SocketAddr::from((Ipv4Addr::LOCALHOST, 4000)),
            identity: self.identity.map(str::to_string),
            serial: self.serial.map(str::to_string),
            not_after: None,
            sni: None,
            alpn: None,
            upstream: None,
            backend: self.backend.map(str::to_string),
            age: Duration::ZERO,
            idle: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
            phase: Phase::Proxied,
        }
    }

    fn signal(&self) -> &CutSignal {
        &self.cut
    }
}

/// `(listener, identity, serial, backend)` of a connection.
type Facts = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

/// Opens a connection in `table` for each of `rows`.
fn open(table: &Arc<Connections>, rows: &[Facts]) -> Vec<Tracked<Fake>> {
    rows.iter()
        .map(|&(listener, identity, serial, backend)| {
            table.track(|id| Fake {
                id,
                listener,
                identity,
                serial,
                backend,
                cut: CutSignal::default(),
            })
        })
        .collect()
}

fn by_identity(identity: &str) -> ConnectionFilter {
    ConnectionFilter {
        identity: Some(identity.into()),
        ..ConnectionFilter::default()
    }
}

fn by_serial(serial: &str) -> ConnectionFilter {
    ConnectionFilter {
        serial: Some(serial.into()),
        ..ConnectionFilter::default()
    }
}

const MTLS: [Facts; 4] = [
    ("tls", Some("alice"), Some("01:a2:ff"), Some("10.0.0.1:80")),
    ("tls", Some("bob"), Some("7f:00"), Some("10.0.0.2:80")),
    ("tls", Some("bob"), Some("7f:01"), Some("10.0.0.1:80")),
    ("plain", None, None, Some("10.0.0.1:80")),
];

fn ids(page: &Page) -> Vec<u64> {
    page.connections.iter().map(|c| c.id).collect()
}

#[test]
fn every_given_field_of_a_filter_must_match_and_an_empty_filter_matches_everything() {
    let table = Arc::new(Connections::default());
    let _open = open(&table, &MTLS);
    let now = Instant::now();
    let all = ConnectionFilter::default();
    assert!(all.is_empty());
    assert_eq!(ids(&table.page(&all, 0, 10, now)), [1, 2, 3, 4]);
    assert_eq!(ids(&table.page(&by_identity("bob"), 0, 10, now)), [2, 3]);
    assert_eq!(
        ids(&table.page(&by_identity("bo"), 0, 10, now)),
        [0u64; 0],
        "exact, not a prefix"
    );
    let bob_on_one = ConnectionFilter {
        identity: Some("bob".into()),
        backend: Some("10.0.0.1:80".into()),
        ..ConnectionFilter::default()
    };
    assert!(!bob_on_one.is_empty());
    assert_eq!(ids(&table.page(&bob_on_one, 0, 10, now)), [3]);
    let plain = ConnectionFilter {
        listener: Some("plain".into()),
        ..ConnectionFilter::default()
    };
    assert_eq!(ids(&table.page(&plain, 0, 10, now)), [4]);
}

#[test]
fn a_serial_matches_with_or_without_colons_in_any_case_without_leading_zeros_or_with_0x() {
    let shown = Seen {
        listener: "tls",
        serial: Some("01:a2:ff"),
        ..Seen::default()
    };
    for wanted in ["01:a2:ff", "01A2FF", "1a2ff", "0x01a2ff", "0:1:A:2:f:F"] {
        assert!(by_serial(wanted).matches(&shown), "{wanted}");
    }
    for other in ["01:a2:fe", "a2ff", "1a2ff00"] {
        assert!(!by_serial(other).matches(&shown), "{other}");
    }
    let unadmitted = Seen {
        listener: "tls",
        ..Seen::default()
    };
    assert!(!by_serial("01a2ff").matches(&unadmitted));
    assert!(!by_identity("alice").matches(&unadmitted));
}

#[test]
fn only_hex_with_optional_colons_is_a_serial() {
    for serial in ["01:a2:ff", "01A2FF", "0x1f", &"ab".repeat(32)] {
        assert!(is_serial(serial), "{serial}");
    }
    for not in ["", ":", "0x", "01-a2", "g1", "01 a2", &"ab".repeat(33)] {
        assert!(!is_serial(not), "{not}");
    }
}

#[test]
fn pages_follow_the_cursor_in_id_order_and_count_every_match() {
    let table = Arc::new(Connections::default());
    let _open = open(&table, &MTLS);
    let all = ConnectionFilter::default();
    let now = Instant::now();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = table.page(&all, after, 1, now);
        assert_eq!(page.total, 4);
        seen.extend(ids(&page));
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, [1, 2, 3, 4]);
    let last = table.page(&all, 2, 2, now);
    assert_eq!((ids(&last), last.next), (vec![3, 4], None));
    let past = table.page(&all, 99, 10, now);
    assert_eq!((past.total, ids(&past), past.next), (4, vec![], None));
}

#[test]
fn a_connection_leaves_the_table_when_its_handle_drops_and_ids_are_not_reused() {
    let table = Arc::new(Connections::default());
    let mut open = open(&table, &MTLS);
    assert_eq!(table.len(), 4);
    open.remove(1);
    assert_eq!(table.len(), 3);
    drop(open);
    assert_eq!(table.len(), 0);
    let again = self::open(&table, &MTLS[..1]);
    assert_eq!(again[0].id(), 5);
}

#[test]
fn closing_cuts_each_match_once_with_the_reason_and_counts_only_what_it_cut() {
    let table = Arc::new(Connections::default());
    let open = open(&table, &MTLS);
    assert_eq!(table.count_matching(&by_identity("bob")), 2);
    assert_eq!(
        table.close_matching(&by_identity("bob"), Cut::ClosedByOperator),
        2
    );
    let reasons: Vec<Option<Cut>> = open.iter().map(|c| c.cut.reason()).collect();
    assert_eq!(
        reasons,
        [
            None,
            Some(Cut::ClosedByOperator),
            Some(Cut::ClosedByOperator),
            None
        ]
    );
    // Still open until their tasks end: neither counted nor cut again, the first reason stands.
    assert_eq!(table.count_matching(&by_identity("bob")), 0);
    assert_eq!(table.close_matching(&by_identity("bob"), Cut::Quarantined), 0);
    assert_eq!(open[1].cut.reason(), Some(Cut::ClosedByOperator));
    assert_eq!(table.close_matching(&by_serial("1a2ff"), Cut::Quarantined), 1);
    assert_eq!(open[0].cut.reason(), Some(Cut::Quarantined));
}

#[tokio::test]
async fn a_cut_wakes_a_waiter_and_a_cut_signal_completes_at_once() {
    let signal = Arc::new(CutSignal::default());
    let waiter = tokio::spawn({
        let signal = Arc::clone(&signal);
        async move { signal.cancelled().await }
    });
    tokio::task::yield_now().await;
    assert!(signal.cut(Cut::ClosedByOperator));
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter wakes")
        .expect("the waiter ends");
    assert!(!signal.cut(Cut::AccessRevoked), "the first reason stands");
    assert_eq!(signal.reason(), Some(Cut::ClosedByOperator));
    tokio::time::timeout(Duration::from_secs(10), signal.cancelled())
        .await
        .expect("completes at once once cut");
}
