//! Three nodes over mutual TLS 1.3.
//!
//! At start-up the example creates a CA and one certificate per node (rcgen; in
//! production these come from your PKI). Each certificate names its node with the DNS
//! SAN `n<id>.node.ackwire` (see `ackwire::transport::tls`). Every connection is
//! authenticated both ways; a node id is what the peer's certificate proves.
//!
//! Run: `cargo run --example secure_cluster`

use ackwire::transport::tls::rustls::pki_types::PrivateKeyDer;
use ackwire::transport::tls::{node_dns_name, TlsConfig};
use ackwire::{ChannelId, ChannelOptions, Guarantee, Node, NodeId, Outcome};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A CA, and a TLS configuration per node signed by it.
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "secure_cluster example CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let tls_for = |id: NodeId| -> Result<TlsConfig, Box<dyn std::error::Error>> {
        let key = KeyPair::generate()?;
        let cert =
            CertificateParams::new(vec![node_dns_name(id)])?.signed_by(&key, &ca, &ca_key)?;
        Ok(TlsConfig::new(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            vec![ca.der().clone()],
        )?)
    };

    let orders = ChannelId(1);
    let (n1, n2, n3) = (NodeId(1), NodeId(2), NodeId(3));
    // n3 is the ledger; n1 and n2 are shops that know where it is. With TLS, the CA
    // decides who is a peer: n3 need not list its clients.
    let ledger = Node::builder(n3)
        .bind("127.0.0.1:0".parse()?)
        .tls(tls_for(n3)?)
        .build()
        .await?;
    let ledger_addr = ledger.local_addr().expect("tcp listens");
    let mut shops = Vec::new();
    for id in [n1, n2] {
        shops.push(
            Node::builder(id)
                .bind("127.0.0.1:0".parse()?)
                .peer(n3, ledger_addr)
                .tls(tls_for(id)?)
                .build()
                .await?,
        );
    }

    let mut inbox = ledger.receiver::<String>(orders, false)?;
    let consumer = tokio::spawn(async move {
        let mut n = 0;
        while let Some(d) = inbox.recv().await {
            println!("ledger: {} (from {})", d.message(), d.from());
            d.ack();
            n += 1;
            if n == 6 {
                break;
            }
        }
    });
    let mut receipts = Vec::new();
    for shop in &shops {
        let out =
            shop.sender::<String>(n3, ChannelOptions::new(orders, Guarantee::EffectivelyOnce))?;
        for k in 0..3 {
            receipts.push(out.send(&format!("order {k} of {}", shop.id())).await?);
        }
    }
    for r in receipts {
        assert_eq!(r.await?, Outcome::Acked);
    }
    consumer.await?;
    let s = ledger.tcp_stats().expect("tcp transport");
    println!(
        "ledger: {} authenticated connections, {} refused (tls/identity)",
        s.connections_opened,
        s.rejected_tls_no_certificate
            + s.rejected_tls_untrusted
            + s.rejected_tls_expired
            + s.rejected_tls_other
            + s.rejected_identity_mismatch
    );
    for shop in shops {
        shop.shutdown().await;
    }
    ledger.shutdown().await;
    Ok(())
}
