//! The KMIP key provider against a real PyKMIP server, over mutual TLS with
//! certificates made at test time (tests/src/kmip.rs).

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use vmcrypt_core::kms::kmip::{KmipConfig, KmipProvider, KmipVersion};
use vmcrypt_core::kms::{KeyProvider, KeyState, ProviderError};
use vmcrypt_tests::kmip::{free_port, Pki, PyKmipServer};

/// Everything the client logs (all levels), from every test of this file.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&b)))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        // Shown with --nocapture (eprint! goes through the test's capture).
        eprint!("{}", String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> Vec<u8> {
    captured().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The forms key bytes could take in text.
fn key_forms(key: &[u8]) -> Vec<Vec<u8>> {
    let lower: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let upper = lower.to_uppercase();
    let debug = format!("{key:?}"); // [12, 34, ...]
    let debug_hex = format!("{key:02x?}"); // [0c, 22, ...]
    vec![
        key.to_vec(),
        lower.into_bytes(),
        upper.into_bytes(),
        debug.into_bytes(),
        debug_hex.into_bytes(),
        // any 8-byte window, hex
        key[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_key(what: &str, text: &[u8], key: &[u8]) {
    for form in key_forms(key) {
        assert!(
            !contains(text, &form),
            "{what} contains the key bytes ({})",
            String::from_utf8_lossy(&form)
        );
    }
}

fn provider(cfg: &KmipConfig) -> KmipProvider {
    captured();
    KmipProvider::new(cfg).expect("provider config")
}

/// create (+activate) / get / locate / state / revoke / destroy over the
/// given KMIP version; returns the key bytes seen, for the log checks.
fn lifecycle(pki: &Pki, server: &PyKmipServer, version: KmipVersion) -> Result<Vec<u8>> {
    let mut cfg = pki.config("kms-test", &[server.addr()]);
    cfg.version = version;
    let p = provider(&cfg);
    let t = Instant::now();
    p.check()?;
    let label = format!("vm-disk-kek-{version}");
    let id = p.create_key(&label)?;
    eprintln!("created key {id} over KMIP {version} in {:?}", t.elapsed());
    assert_eq!(p.state(&id)?, KeyState::Active);

    let t = Instant::now();
    let k1 = p.get_key(&id)?;
    eprintln!("get in {:?}", t.elapsed());
    let k2 = p.get_key(&id)?;
    assert_eq!(k1.0.len(), 32);
    assert_eq!(*k1.0, *k2.0, "the same key twice");
    assert_ne!(**k1.0, [0u8; 32]);
    let key = k1.0.to_vec();
    assert_eq!(format!("{k1:?}"), "Kek(redacted)");
    assert_no_key("Debug of the provider", format!("{p:?}").as_bytes(), &key);

    // a second key, to make Locate choose
    let other = p.create_key(&format!("{label}-other"))?;
    assert_ne!(other, id);
    assert_eq!(p.locate(&label)?, vec![id.clone()]);
    assert!(p.locate("no-such-label")?.is_empty());

    // an active key cannot be destroyed (PyKMIP: Permission Denied)
    match p.destroy(&id) {
        Err(ProviderError::Refused { message, .. }) => {
            assert!(message.contains("active"), "{message}")
        }
        other => panic!("destroy of an active key: {other:?}"),
    }

    p.revoke(&id)?;
    assert_eq!(p.state(&id)?, KeyState::Deactivated);
    let e = p.get_key(&id).expect_err("get of a revoked key must fail");
    eprintln!("get after revoke: {e}");
    assert!(
        matches!(
            e,
            ProviderError::NotActive {
                state: KeyState::Deactivated,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("key {id} is Deactivated, not active")
    );

    p.destroy(&id)?;
    for r in [
        p.state(&id).map(|_| ()),
        p.get_key(&id).map(|_| ()),
        p.revoke(&id),
    ] {
        match r {
            Err(ProviderError::NotFound(k)) => assert_eq!(k, id),
            other => panic!("after destroy: {other:?}"),
        }
    }
    assert!(p.locate(&label)?.is_empty());
    p.revoke(&other)?;
    p.destroy(&other)?;
    Ok(key)
}

#[test]
fn kmip_lifecycle_1_1_and_1_2() -> Result<()> {
    let t0 = Instant::now();
    let pki = Pki::new()?;
    eprintln!("certificates made in {:?}", t0.elapsed());
    let t = Instant::now();
    let mut server = PyKmipServer::start(&pki)?;
    eprintln!("pykmip-server ready in {:?}", t.elapsed());

    let k11 = lifecycle(&pki, &server, KmipVersion::V1_1)?;
    let k12 = lifecycle(&pki, &server, KmipVersion::V1_2)?;

    // Ownership follows the certificate's CN: another client of the same
    // CA neither finds nor reads this client's keys.
    let p = provider(&pki.config("kms-test", &[server.addr()]));
    let id = p.create_key("owned")?;
    let key = p.get_key(&id)?.0.to_vec();
    let p2 = provider(&KmipConfig::new(
        "kms-test",
        vec![server.addr()],
        &pki.ca_cert,
        &pki.client2_cert,
        &pki.client2_key,
    ));
    p2.check()?;
    assert!(p2.locate("owned")?.is_empty());
    match p2.get_key(&id) {
        Err(ProviderError::Refused { message, .. }) => {
            eprintln!("other CN: {message}");
            assert!(message.contains("Permission Denied"), "{message}")
        }
        other => panic!("other CN reading the key: {other:?}"),
    }

    let log = log_text();
    for k in [&k11, &k12, &key] {
        assert_no_key("the client's log", &log, k);
    }
    let stopped_in = server.stop()?;
    eprintln!("pykmip-server stopped (SIGINT) in {stopped_in:?}");
    let server_log = std::fs::read(server.log_path())?;
    for k in [&k11, &k12, &key] {
        assert_no_key("PyKMIP's server.log", &server_log, k);
    }
    eprintln!("total {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn kmip_unreachable_within_timeout() -> Result<()> {
    let pki = Pki::new()?;
    // Closed ports: refused at once.
    let closed = [free_port()?, free_port()?];
    let mut cfg = pki.config(
        "kms-down",
        &closed
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>(),
    );
    cfg.timeout_ms = 2000;
    let p = provider(&cfg);
    let t = Instant::now();
    let e = p.create_key("x").expect_err("no server is up");
    let took = t.elapsed();
    eprintln!("closed ports: {e} (after {took:?})");
    assert!(took < Duration::from_secs(2), "{took:?}");
    match &e {
        ProviderError::Unreachable { provider, details } => {
            assert_eq!(provider, "kms-down");
            for port in closed {
                assert!(details.contains(&format!("127.0.0.1:{port}")), "{details}");
            }
            assert!(details.contains("refused"), "{details}");
        }
        other => panic!("{other:?}"),
    }

    // Listening sockets that never answer: each server costs one timeout.
    let silent = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    let addrs: Vec<String> = silent
        .iter()
        .map(|l| Ok(l.local_addr()?.to_string()))
        .collect::<Result<_>>()?;
    let mut cfg = pki.config("kms-silent", &addrs);
    cfg.timeout_ms = 1000;
    let p = provider(&cfg);
    let t = Instant::now();
    let e = p.get_key("1").expect_err("no server answers");
    let took = t.elapsed();
    eprintln!("silent servers: {e} (after {took:?})");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2 * 1000 + 1500),
        "{took:?}"
    );
    match &e {
        ProviderError::Unreachable { details, .. } => {
            assert_eq!(details.matches("timed out").count(), 2, "{details}");
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn kmip_failover() -> Result<()> {
    let pki = Pki::new()?;
    let server = PyKmipServer::start(&pki)?;
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let closed = format!("127.0.0.1:{}", free_port()?);

    // First server down (refused), second up.
    let p = provider(&pki.config("kms-ha", &[closed.clone(), server.addr()]));
    let t = Instant::now();
    let id = p.create_key("failover")?;
    let k = p.get_key(&id)?;
    eprintln!(
        "failover past a closed port: create+get in {:?}",
        t.elapsed()
    );
    assert_eq!(p.locate("failover")?, vec![id.clone()]);

    // First server hangs: the timeout moves on to the second.
    let mut cfg = pki.config("kms-ha", &[silent.local_addr()?.to_string(), server.addr()]);
    cfg.timeout_ms = 1000;
    let p = provider(&cfg);
    let t = Instant::now();
    let k2 = p.get_key(&id)?;
    let took = t.elapsed();
    eprintln!("failover past a silent server: get in {took:?}");
    assert_eq!(*k.0, *k2.0);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2500),
        "{took:?}"
    );

    // A KMIP error is final: no failover to the (same) next server.
    let p = provider(&pki.config("kms-ha", &[server.addr(), closed.clone()]));
    match p.get_key("999999") {
        Err(ProviderError::NotFound(k)) => assert_eq!(k, "999999"),
        other => panic!("{other:?}"),
    }
    assert_no_key("the client's log", &log_text(), &k.0[..]);
    Ok(())
}

#[test]
fn kmip_wrong_certificates() -> Result<()> {
    let pki = Pki::new()?;
    let server = PyKmipServer::start(&pki)?;

    // Our client certificate is signed by a CA the server does not trust.
    let cfg = KmipConfig::new(
        "kms-test",
        vec![server.addr()],
        &pki.ca_cert,
        &pki.other_client_cert,
        &pki.other_client_key,
    );
    let p = provider(&cfg);
    let t = Instant::now();
    let e = p.create_key("x").expect_err("wrong client certificate");
    eprintln!("wrong client certificate: {e} (after {:?})", t.elapsed());
    match &e {
        ProviderError::Refused { message, .. } => {
            assert!(message.contains("TLS"), "{message}");
            assert!(message.contains("client certificate"), "{message}");
            assert!(message.contains(&server.addr()), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // The server's certificate is not signed by the CA we trust.
    let cfg = KmipConfig::new(
        "kms-test",
        vec![server.addr()],
        &pki.other_ca_cert,
        &pki.client_cert,
        &pki.client_key,
    );
    let e = provider(&cfg).check().expect_err("untrusted server");
    eprintln!("untrusted server: {e}");
    match &e {
        ProviderError::Unreachable { details, .. } => {
            assert!(details.contains("not trusted"), "{details}");
            assert!(details.contains("UnknownIssuer"), "{details}");
        }
        other => panic!("{other:?}"),
    }

    // A DNS name works too (the certificate names localhost).
    provider(&pki.config("kms-test", &[format!("localhost:{}", server.port())])).check()?;

    // Broken configuration is caught before any connection.
    let mut bad = pki.config("kms-test", &[server.addr()]);
    bad.client_key = pki.other_client_key.clone();
    let e = KmipProvider::new(&bad).expect_err("mismatched key");
    eprintln!("mismatched key: {e}");
    let mut bad = pki.config("kms-test", &[]);
    bad.servers.clear();
    assert!(KmipProvider::new(&bad).is_err());
    let mut bad = pki.config("kms-test", &["no-port".into()]);
    bad.ca_cert = pki.dir().join("missing.pem");
    assert!(KmipProvider::new(&bad).is_err());
    Ok(())
}
