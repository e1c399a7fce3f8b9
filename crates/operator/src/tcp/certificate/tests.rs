use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A device's key and its request for `list`.
fn request(list: &[&str]) -> (String, String) {
    let key = csr::new_key().unwrap();
    let pem = csr::make(&key, &names(list)).unwrap();
    (key, pem)
}

fn local_ca() -> (tempfile::TempDir, portway_tls::ca::LocalCa) {
    let dir = tempfile::tempdir().unwrap();
    let ca = portway_tls::ca::LocalCa::load_or_create(dir.path()).unwrap();
    (dir, ca)
}

#[test]
fn a_request_is_checked_against_the_names_the_proxy_serves() {
    let served = names(&["db.example.com", "u1.portway.test"]);
    assert_eq!(check(None, &served, &|_| true, true), Verdict::None);
    let (_, good) = request(&["u1.portway.test", "db.example.com"]);
    assert!(
        matches!(check(Some(&good), &served, &|_| true, true), Verdict::Wanted(r) if r.names.len() == 2)
    );
    let cases: [(&str, &[String], bool, &str, &str); 4] = [
        (
            "garbage",
            &served,
            true,
            INVALID_REQUEST,
            "spec.tls.certificateRequest: not a PEM",
        ),
        (
            &good,
            &served[..1],
            true,
            NAME_NOT_SERVED,
            "names u1.portway.test, which this proxy does not serve (it serves db.example.com)",
        ),
        (
            &good,
            &[],
            true,
            NAME_NOT_SERVED,
            "it serves none yet: it is not accepted",
        ),
        (&good, &served, false, NO_ISSUER, "issues no certificates"),
    ];
    for (pem, served, issuer, reason, says) in cases {
        match check(Some(pem), served, &|_| true, issuer) {
            Verdict::Refused(r, message) => {
                assert_eq!(r, reason, "{message}");
                assert!(message.contains(says), "{message}");
            }
            other => panic!("{pem:.20}: {other:?}"),
        }
    }
}

#[test]
fn renewal_comes_with_the_window_left_but_never_past_two_thirds_of_the_life() {
    let t0 = SystemTime::UNIX_EPOCH + DAY * 1000;
    assert_eq!(renew_at(t0, t0 + DAY * 90, DAY * 30), t0 + DAY * 60);
    assert_eq!(renew_at(t0, t0 + DAY * 90, DAY * 80), t0 + DAY * 30);
    let short = Duration::from_secs(30);
    assert_eq!(renew_at(t0, t0 + short, DAY), t0 + Duration::from_secs(10));
}

#[test]
fn a_chain_in_status_that_answers_the_request_is_kept_and_nothing_is_issued() {
    let (_dir, ca) = local_ca();
    let (_, pem) = request(&["u1.portway.test"]);
    let Verdict::Wanted(req) = check(Some(&pem), &names(&["u1.portway.test"]), &|_| true, true)
    else {
        panic!()
    };
    let issued = ca.sign(&req, DAY * 90).unwrap();
    let chain = format!("{}{}", issued.cert_pem, ca.cert_pem);
    let certs = DeviceCertificates::default();
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Wanted(req.clone()),
        Some(&chain),
        "local-ca",
        DAY * 30,
    );
    assert_eq!(out.chain.as_deref(), Some(chain.as_str()));
    let (status, reason, message) = out.condition.unwrap();
    assert!(status && reason == ISSUED, "{message}");
    let (due, _) = certs.due(tokio::time::Instant::now(), SystemTime::now());
    assert!(due.is_empty(), "nothing to issue: {due:?}");

    // Another key for the same names: the chain no longer answers it, and it is issued.
    let (_, other) = request(&["u1.portway.test"]);
    let Verdict::Wanted(other) = check(Some(&other), &names(&["u1.portway.test"]), &|_| true, true)
    else {
        panic!()
    };
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Wanted(other.clone()),
        Some(&chain),
        "local-ca",
        DAY * 30,
    );
    assert_eq!(out.chain, None);
    assert_eq!(out.condition.unwrap().1, PENDING);
    let (due, _) = certs.due(tokio::time::Instant::now(), SystemTime::now());
    assert_eq!(due, vec![(("ns".to_owned(), "db".to_owned()), other)]);

    // A refused request drops the entry and the chain.
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Refused(NAME_NOT_SERVED, "x".into()),
        Some(&chain),
        "local-ca",
        DAY * 30,
    );
    assert_eq!(
        (out.chain, out.condition.map(|c| c.1)),
        (None, Some(NAME_NOT_SERVED))
    );
    assert!(
        certs
            .due(tokio::time::Instant::now(), SystemTime::now())
            .0
            .is_empty()
    );
}

#[test]
fn an_issuance_is_recorded_for_its_own_request_and_failures_back_off() {
    let (_dir, ca) = local_ca();
    let served = names(&["u1.portway.test"]);
    let (_, pem) = request(&["u1.portway.test"]);
    let Verdict::Wanted(req) = check(Some(&pem), &served, &|_| true, true) else {
        panic!()
    };
    let certs = DeviceCertificates::default();
    let key = ("ns".to_owned(), "db".to_owned());
    certs.observe(
        ("ns", "db"),
        Verdict::Wanted(req.clone()),
        None,
        "local-ca",
        DAY * 30,
    );
    let retry = Retry {
        first: Duration::from_secs(5),
        max: Duration::from_secs(600),
        renew_before: DAY * 30,
    };

    certs.issued(&key, &req, Err("the ACME server said no".into()), &retry);
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Wanted(req.clone()),
        None,
        "acme",
        DAY * 30,
    );
    let (status, reason, message) = out.condition.unwrap();
    assert!(
        !status && reason == ISSUE_FAILED && message.contains("said no"),
        "{message}"
    );
    let (due, next) = certs.due(tokio::time::Instant::now(), SystemTime::now());
    assert!(
        due.is_empty() && next <= Duration::from_secs(5),
        "{due:?} {next:?}"
    );
    certs.issued(&key, &req, Err("again".into()), &retry);
    let delay = certs.entries.lock()[&key].retry.unwrap().1;
    assert_eq!(delay, Duration::from_secs(10));

    // A certificate for another key is refused rather than handed to the device.
    let (_, stranger) = request(&["u1.portway.test"]);
    let Verdict::Wanted(stranger) = check(Some(&stranger), &served, &|_| true, true) else {
        panic!()
    };
    let wrong = ca.sign(&stranger, DAY).unwrap().cert_pem;
    certs.issued(&key, &req, Ok(wrong), &retry);
    assert!(
        matches!(&certs.entries.lock()[&key].state, State::Failed(e) if e.contains("another key"))
    );

    // A result for a request the proxy no longer makes is dropped.
    let right = ca.sign(&req, DAY * 90).unwrap().cert_pem;
    certs.issued(&key, &stranger, Ok(right.clone()), &retry);
    assert!(certs.entries.lock()[&key].chain.is_none());
    certs.issued(&key, &req, Ok(right.clone()), &retry);
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Wanted(req),
        None,
        "local-ca",
        DAY * 30,
    );
    assert_eq!(out.chain, Some(right));
    assert_eq!(out.condition.unwrap().1, ISSUED);
}

#[test]
fn a_served_name_is_signed_only_under_the_zone_or_proven() {
    let served = names(&["u1.portway.test", "www.example.com"]);
    let (_, pem) = request(&["u1.portway.test", "www.example.com"]);
    let proven = |h: &str| h.ends_with(".portway.test");
    match check(Some(&pem), &served, &proven, true) {
        Verdict::Refused(reason, message) => {
            assert_eq!(reason, NAME_NOT_PROVEN);
            assert!(
                message.contains("www.example.com") && !message.contains("u1."),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A proxy gets a certificate for a new key at most every ten minutes, renewals aside;
/// the installation at most [`PER_HOUR`] an hour; the condition says why one waits.
#[test]
fn issuing_is_limited_per_proxy_and_per_hour() {
    let (_dir, ca) = local_ca();
    let served = names(&["u1.portway.test"]);
    let certs = DeviceCertificates::default();
    let retry = Retry {
        first: Duration::from_secs(5),
        max: Duration::from_secs(600),
        renew_before: DAY * 30,
    };
    let key = ("ns".to_owned(), "db".to_owned());
    let wanted = |pem: &str| match check(Some(pem), &served, &|_| true, true) {
        Verdict::Wanted(r) => r,
        other => panic!("{other:?}"),
    };
    let first = wanted(&request(&["u1.portway.test"]).1);
    certs.observe(
        ("ns", "db"),
        Verdict::Wanted(first.clone()),
        None,
        "local-ca",
        DAY * 30,
    );
    let now = tokio::time::Instant::now();
    assert_eq!(certs.due(now, SystemTime::now()).0.len(), 1);
    certs.issued(
        &key,
        &first,
        Ok(ca.sign(&first, DAY * 90).unwrap().cert_pem),
        &retry,
    );

    // A new key at once: it waits, and says why.
    let second = wanted(&request(&["u1.portway.test"]).1);
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Wanted(second.clone()),
        None,
        "local-ca",
        DAY * 30,
    );
    assert_eq!(out.chain, None);
    let (due, next) = certs.due(tokio::time::Instant::now(), SystemTime::now());
    assert!(due.is_empty(), "{due:?}");
    // Looked at again within the minute (the loop never sleeps longer), not at once.
    assert!(next > Duration::from_secs(30), "{next:?}");
    let out = certs.observe(
        ("ns", "db"),
        Verdict::Wanted(second),
        None,
        "local-ca",
        DAY * 30,
    );
    let (_, reason, message) = out.condition.unwrap();
    assert_eq!(reason, PENDING);
    assert!(message.contains("at most every 10 minutes"), "{message}");
    // The chain the new key replaced is to be revoked.
    assert_eq!(certs.take_unwanted().len(), 1);

    // Across proxies: the hour's budget.
    for i in 0..PER_HOUR + 2 {
        let r = wanted(&request(&["u1.portway.test"]).1);
        certs.observe(
            ("ns", &format!("p{i}")),
            Verdict::Wanted(r),
            None,
            "local-ca",
            DAY * 30,
        );
    }
    let (due, _) = certs.due(tokio::time::Instant::now(), SystemTime::now());
    assert_eq!(due.len(), PER_HOUR - 1, "one was issued this hour already");
}

#[test]
fn a_certificate_shorter_than_the_window_is_not_renewed_at_once() {
    let (_dir, ca) = local_ca();
    let served = names(&["u1.portway.test"]);
    let Verdict::Wanted(req) = check(
        Some(&request(&["u1.portway.test"]).1),
        &served,
        &|_| true,
        true,
    ) else {
        panic!()
    };
    let certs = DeviceCertificates::default();
    let key = ("ns".to_owned(), "db".to_owned());
    certs.observe(
        ("ns", "db"),
        Verdict::Wanted(req.clone()),
        None,
        "local-ca",
        DAY * 30,
    );
    // An hour's certificate with a 30-day window, from a CA that backdates by an hour.
    let retry = Retry {
        first: Duration::from_secs(5),
        max: Duration::from_secs(600),
        renew_before: DAY * 30,
    };
    certs.issued(
        &key,
        &req,
        Ok(ca.sign(&req, Duration::from_secs(3600)).unwrap().cert_pem),
        &retry,
    );
    let (due, next) = certs.due(tokio::time::Instant::now(), SystemTime::now());
    assert!(due.is_empty(), "renewed at once: {due:?}");
    assert!(next >= Duration::from_secs(59), "{next:?}");
    // One already expired is a failure, retried later, not a chain.
    let expired = ca.sign(&req, Duration::ZERO).unwrap().cert_pem;
    let other = ("ns".to_owned(), "late".to_owned());
    certs.observe(
        ("ns", "late"),
        Verdict::Wanted(req.clone()),
        None,
        "local-ca",
        DAY * 30,
    );
    certs.issued(&other, &req, Ok(expired), &retry);
    assert!(
        matches!(&certs.entries.lock()[&other].state, State::Failed(e) if e.contains("expired"))
    );
}
