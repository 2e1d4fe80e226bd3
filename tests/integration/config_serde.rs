//! Every config type reads and writes itself with serde: defaults round-trip, a file
//! names only what it changes, a typo is an error, durations are human-readable.

use ackwire::dedup::{DedupConfig, DurableDedup};
use ackwire::detector::DetectorConfig;
use ackwire::handoff::{FsyncPolicy, HintStoreConfig};
use ackwire::proto::{Authorization, RelayPolicy};
use ackwire::retry::{RetryBudgetConfig, RetryPolicy, RttConfig};
use ackwire::transport::mem::{FaultPlan, MemNetwork};
use ackwire::transport::tcp::TcpConfig;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, Node, NodeConfig, NodeId, Outcome,
    ProtoConfig, ReceiverOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::time::Duration;

/// Writes `value` as TOML, reads it back, and checks nothing changed (by `Debug`,
/// which prints every field) and that writing it again gives the same text.
fn round_trip<T: Serialize + DeserializeOwned + Debug>(value: &T) -> String {
    let text = toml::to_string(value).unwrap_or_else(|e| panic!("{value:?}: {e}"));
    let back: T = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
    assert_eq!(format!("{back:?}"), format!("{value:?}"), "{text}");
    assert_eq!(toml::to_string(&back).unwrap(), text);
    text
}

#[test]
fn defaults_round_trip_through_toml() {
    round_trip(&NodeConfig::default());
    round_trip(&ProtoConfig::default());
    round_trip(&RetryPolicy::default());
    round_trip(&RttConfig::default());
    round_trip(&RetryBudgetConfig::default());
    round_trip(&DetectorConfig::default());
    round_trip(&DedupConfig::default());
    round_trip(&HintStoreConfig::default());
    round_trip(&TcpConfig::default());
    round_trip(&ReceiverOptions::default());
    round_trip(&Authorization::default());
    round_trip(&ChannelOptions::new(ChannelId(4), Guarantee::AtLeastOnce));

    // An empty file is the defaults.
    let empty: NodeConfig = toml::from_str("").unwrap();
    assert_eq!(format!("{empty:?}"), format!("{:?}", NodeConfig::default()));
    let empty: TcpConfig = toml::from_str("").unwrap();
    assert_eq!(empty, TcpConfig::default());
}

/// Removes each value of `value`'s TOML form in turn (at every nesting level) and checks
/// the file without it still reads back as `value`: a missing key takes its default,
/// never the field type's `Default`. Returns how many keys were checked.
fn each_missing_key_keeps_its_default<T: Serialize + DeserializeOwned + Debug>(value: &T) -> usize {
    fn paths(t: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for (k, v) in t {
            prefix.push(k.clone());
            match v {
                // A table left out whole may be an `Option` (`handoff`): `None`.
                toml::Value::Table(inner) => paths(inner, prefix, out),
                // An enum is a one-key table (`fsync = { Every = "10ms" }`).
                _ if t.len() > 1 => out.push(prefix.clone()),
                _ => {}
            }
            prefix.pop();
        }
    }
    let full: toml::Table = toml::from_str(&toml::to_string(value).unwrap()).unwrap();
    let mut all = Vec::new();
    paths(&full, &mut Vec::new(), &mut all);
    for path in &all {
        let mut t = full.clone();
        let mut at = &mut t;
        for k in &path[..path.len() - 1] {
            at = at.get_mut(k).and_then(toml::Value::as_table_mut).unwrap();
        }
        at.remove(path.last().unwrap());
        let text = toml::to_string(&t).unwrap();
        let back: T = toml::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert_eq!(
            format!("{back:?}"),
            format!("{value:?}"),
            "leaving out {path:?} changed the config"
        );
    }
    all.len()
}

#[test]
fn a_key_left_out_keeps_its_default_at_every_level() {
    // Regression: `[proto.retry] jitter = false` left the retry deadline `None`
    // (messages retried for ever): the field's own `#[serde(default)]` won over the
    // struct's `Some(30 s)`.
    let c: NodeConfig = toml::from_str("[proto.retry]\njitter = false").unwrap();
    assert_eq!(c.proto.retry.deadline, Some(Duration::from_secs(30)));
    let p: RetryPolicy = toml::from_str("").unwrap();
    assert_eq!(p, RetryPolicy::default());

    let mut with_handoff = NodeConfig::default();
    with_handoff.handoff = Some(HandoffConfig::new("."));
    let n = each_missing_key_keeps_its_default(&NodeConfig::default())
        + each_missing_key_keeps_its_default(&with_handoff)
        + each_missing_key_keeps_its_default(&ProtoConfig::default())
        + each_missing_key_keeps_its_default(&RetryPolicy::default())
        + each_missing_key_keeps_its_default(&DedupConfig::default())
        + each_missing_key_keeps_its_default(&HintStoreConfig::default())
        + each_missing_key_keeps_its_default(&TcpConfig::default())
        + each_missing_key_keeps_its_default(&ReceiverOptions::default())
        + each_missing_key_keeps_its_default(&DetectorConfig::default());
    assert!(n > 60, "only {n} keys checked");
}

#[test]
fn every_non_default_option_round_trips() {
    let mut c = NodeConfig::default();
    c.shutdown_drain = Duration::MAX;
    c.heartbeat_interval = Duration::from_millis(1500);
    c.proto.retry.deadline = None;
    c.proto.retry.max_attempts = Some(7);
    c.proto.ack_delay = Duration::from_micros(250);
    c.dedup.durable = Some(DurableDedup::new("state/dedup"));
    let mut handoff = HandoffConfig::new("state");
    handoff.store.fsync = FsyncPolicy::Every(Duration::from_millis(10));
    handoff.on_down = false;
    c.handoff = Some(handoff);
    // One restricted channel here: `Debug` prints the channel map in hash order.
    c.authorization = Authorization::default()
        .restrict_channel(ChannelId(2), [NodeId(5), NodeId(3)])
        .relay(RelayPolicy::Peers([NodeId(9)].into()));
    let text = round_trip(&c);
    assert!(text.contains("shutdown_drain = \"never\""), "{text}");
    assert!(text.contains("heartbeat_interval = \"1s500ms\""), "{text}");
    assert!(text.contains("deadline = \"none\""), "{text}");

    let mut opts = ChannelOptions::new(ChannelId(4), Guarantee::EffectivelyOnce);
    opts.deadline = Some(Duration::from_secs(90));
    let text = round_trip(&opts);
    assert!(text.contains("deadline = \"1m30s\""), "{text}");
    round_trip(&ReceiverOptions::ordered());

    let authz = Authorization::default()
        .restrict_channel(ChannelId(2), [NodeId(5), NodeId(3)])
        .restrict_channel(ChannelId(1), [NodeId(2)])
        .relay(RelayPolicy::Anyone);
    let text = toml::to_string(&authz).unwrap();
    assert_eq!(
        toml::from_str::<Authorization>(&text).unwrap(),
        authz,
        "{text}"
    );
}

#[test]
fn five_s_parses_to_five_seconds() {
    let c: NodeConfig = toml::from_str("shutdown_drain = \"5s\"").unwrap();
    assert_eq!(c.shutdown_drain, Duration::from_secs(5));
    let c: NodeConfig =
        toml::from_str("heartbeat_interval = \"200ms\"\n[proto.retry]\ndeadline = \"24h\"\n")
            .unwrap();
    assert_eq!(c.heartbeat_interval, Duration::from_millis(200));
    assert_eq!(c.proto.retry.deadline, Some(Duration::from_secs(24 * 3600)));
    let c: NodeConfig = toml::from_str("[proto.retry]\ndeadline = \"none\"").unwrap();
    assert_eq!(c.proto.retry.deadline, None);
}

#[test]
fn a_partial_file_keeps_every_other_default() {
    let c: NodeConfig = toml::from_str(
        r#"
        heartbeat_interval = "250ms"

        [dedup]
        horizon = "5m"

        [proto.retry_budget]
        ttl = "20s"
        "#,
    )
    .unwrap();
    let d = NodeConfig::default();
    assert_eq!(c.heartbeat_interval, Duration::from_millis(250));
    assert_eq!(c.dedup.horizon, Duration::from_secs(300));
    assert_eq!(c.proto.retry_budget.ttl, Duration::from_secs(20));
    // Nested tables start from the node's defaults, not the nested type's own: the
    // node's dedup window (8192, not DedupConfig's 1024) and the protocol's retry
    // budget (ratio 1.0, not RetryBudgetConfig's 0.2) survive.
    assert_eq!(c.dedup.window, 8192);
    assert_eq!(c.dedup.window, d.dedup.window);
    assert_eq!(c.proto.retry_budget.retry_ratio, 1.0);
    assert_eq!(
        c.proto.retry_budget.min_retries_per_sec,
        d.proto.retry_budget.min_retries_per_sec
    );
    assert_eq!(c.shutdown_drain, d.shutdown_drain);
    assert_eq!(c.detector, d.detector);
    assert_eq!(c.proto.rtt, d.proto.rtt);
    assert_eq!(c.proto.retry, d.proto.retry);
    assert_eq!(c.proto.max_in_flight, d.proto.max_in_flight);
    assert!(c.handoff.is_none());
    assert!(c.validate().is_ok());

    // A `[handoff]` table turns handoff on with its defaults for what it leaves out.
    let c: NodeConfig = toml::from_str(
        r#"
        [handoff]
        on_give_up = false
        [handoff.store]
        dir = "hints-here"
        fsync = { Every = "50ms" }
        "#,
    )
    .unwrap();
    let h = c.handoff.expect("handoff on");
    let mut want = HandoffConfig::new("hints-here");
    want.on_give_up = false;
    want.store.fsync = FsyncPolicy::Every(Duration::from_millis(50));
    assert_eq!(format!("{h:?}"), format!("{want:?}"));

    // TCP: one field changed, the rest default.
    let t: TcpConfig = toml::from_str("connect_timeout = \"1s\"\nversions = { min = 2 }").unwrap();
    assert_eq!(t.connect_timeout, Duration::from_secs(1));
    assert_eq!(t.versions.min, 2);
    assert_eq!(t.versions.max, TcpConfig::default().versions.max);
    assert_eq!(t.backoff_max, TcpConfig::default().backoff_max);
}

#[test]
fn a_typo_is_a_typed_error_naming_the_field() {
    let cases = [
        ("heartbeat_intervl = \"1s\"", "heartbeat_intervl"),
        ("[proto]\nmax_inflight = 5", "max_inflight"),
        ("[proto.retry_budget]\nratio = 0.5", "ratio"),
        ("[dedup]\nhorizn = \"1m\"", "horizn"),
        ("[handoff.store]\ndirectory = \"x\"", "directory"),
        (
            "[authorization]\nchannels = [{ channel = 1, sender = [2] }]",
            "sender",
        ),
    ];
    for (text, field) in cases {
        let err: toml::de::Error = toml::from_str::<NodeConfig>(text).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("unknown field `{field}`")),
            "{text}: {msg}"
        );
    }
    let err = toml::from_str::<TcpConfig>("stale_afterr = \"1s\"").unwrap_err();
    assert!(
        err.to_string().contains("unknown field `stale_afterr`"),
        "{err}"
    );
}

#[test]
fn a_bad_duration_is_an_error_saying_what_is_expected() {
    for bad in ["\"5\"", "\"5 sec\"", "\"fast\"", "5", "\"-1s\""] {
        let text = format!("shutdown_drain = {bad}");
        let err = toml::from_str::<NodeConfig>(&text).unwrap_err().to_string();
        assert!(err.contains("\"200ms\""), "{text}: {err}");
    }
}

#[test]
fn authorization_reads_channel_lists_and_relay_policy() {
    let c: NodeConfig = toml::from_str(
        r#"
        [authorization]
        relay = { Peers = [9] }
        channels = [ { channel = 1, senders = [2, 3] } ]
        "#,
    )
    .unwrap();
    let a = &c.authorization;
    assert!(a.may_send(NodeId(2), ChannelId(1)));
    assert!(!a.may_send(NodeId(4), ChannelId(1)));
    assert!(a.may_send(NodeId(4), ChannelId(2)));
    assert!(a.may_relay(NodeId(9)) && !a.may_relay(NodeId(2)));

    let twice = "[authorization]\nchannels = [{ channel = 1, senders = [2] }, { channel = 1, senders = [3] }]";
    let err = toml::from_str::<NodeConfig>(twice).unwrap_err().to_string();
    assert!(err.contains("channel 1 is listed twice"), "{err}");
}

/// A node built from a config read from TOML works: a message sent with the file's
/// retry deadline is acked.
#[tokio::test(start_paused = true)]
async fn a_node_built_from_a_toml_config_delivers() {
    let config: NodeConfig = toml::from_str(
        r#"
        heartbeat_interval = "500ms"
        [proto]
        max_in_flight = 1024
        [proto.retry]
        deadline = "10s"
        "#,
    )
    .unwrap();
    let opts: ChannelOptions =
        toml::from_str("channel = 7\nguarantee = \"EffectivelyOnce\"\ndeadline = \"3s\"").unwrap();
    assert_eq!(opts.deadline, Some(Duration::from_secs(3)));

    let net = MemNetwork::new(FaultPlan::default()).unwrap();
    let mut nodes = Vec::new();
    for id in [1, 2] {
        let node = Node::builder(NodeId(id))
            .transport(net.transport(NodeId(id)))
            .config(config.clone())
            .build()
            .await
            .unwrap();
        nodes.push(node);
    }
    let mut rx = nodes[1].receiver::<String>(ChannelId(7), false).unwrap();
    let tx = nodes[0].sender::<String>(NodeId(2), opts).unwrap();
    let receipt = tx.send(&"from toml".to_string()).await.unwrap();
    let d = rx.recv().await.unwrap();
    assert_eq!(d.message(), "from toml");
    d.ack();
    assert_eq!(receipt.await.unwrap(), Outcome::Acked);
}

/// TLS material is named by paths (`TlsFiles`): a `[tls]` table loads into a
/// `TlsConfig`; a missing file is an error naming it; a typo is an error.
#[cfg(feature = "tls")]
#[test]
fn tls_files_named_in_toml_load_a_tls_config() {
    use ackwire::transport::tls::{node_dns_name, TlsFiles, TlsFilesError};
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params = rcgen::CertificateParams::new(vec![node_dns_name(NodeId(3))]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("node.pem"), cert.pem()).unwrap();
    std::fs::write(path("node.key"), key.serialize_pem()).unwrap();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();

    // TOML literal strings ('…') take a path as it is.
    let text = format!(
        "cert_chain = '{}'\nkey = '{}'\ntrusted_roots = '{}'\n",
        path("node.pem").display(),
        path("node.key").display(),
        path("ca.pem").display()
    );
    let files: TlsFiles = toml::from_str(&text).unwrap();
    assert_eq!(files.key, path("node.key"));
    let tls = files.load().unwrap();
    assert!(tls.certifies(NodeId(3)));
    assert!(!tls.certifies(NodeId(4)));

    let mut missing = files.clone();
    missing.key = path("missing.key");
    match missing.load() {
        Err(TlsFilesError::Read { path: p, .. }) => assert_eq!(p, path("missing.key")),
        other => panic!("expected a read error, got {other:?}"),
    }
    let mut swapped = files.clone();
    swapped.key = path("ca.pem"); // a certificate where the key should be
    assert!(matches!(swapped.load(), Err(TlsFilesError::Config(_))));

    let err = toml::from_str::<TlsFiles>("cert = 'x'")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `cert`"), "{err}");
}
