//! ACME issuance (RFC 8555, through `instant-acme`). Each answer is a Secret in
//! `portway-system`:
//! - names in the zone (its wildcard included) are answered over DNS-01 by Portway's own
//!   DNS server, which publishes `_acme-challenge.<name>` TXT
//!   ([`portway_api::certificates::challenge_record`]). That is how the zone gets a
//!   wildcard, so a new tunnel has HTTPS with no ACME round trip;
//! - proven names outside the zone ([`crate::verify`]) are answered over HTTP-01 by every
//!   edge, built-in or Envoy ([`portway_api::certificates::http01_answer`]): their DNS is
//!   not ours, but it points at the edges.
//!
//! The account key is kept in a Secret too, so a restarted operator does not register a
//! new account. Before telling the ACME server a challenge is ready, the answer is looked
//! up as the server will (the TXT record at the zone's DNS server, or the HTTP answer at
//! the name's address), as cert-manager does: the server checks once, and an answer not
//! yet served would fail the order. A certificate no longer wanted is revoked.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::rr::RecordType;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType,
    ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
    RevocationReason, RevocationRequest,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use portway_api::certificates::{
    CHALLENGE_LABEL, HTTP01_HOST, HTTP01_PATH, RECORD, SYSTEM_NAMESPACE,
};
use portway_api::managers;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

/// Where certificates come from, and how to reach it.
#[derive(Clone)]
pub struct Config {
    /// The directory URL (`https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// `mailto:` contact, if any.
    pub email: Option<String>,
    /// External account binding: key id and the HMAC key (base64url, as CAs hand it out).
    pub eab: Option<(String, String)>,
    /// Roots to trust for the directory instead of the system's (PEM; Pebble's own).
    pub directory_roots: Option<Vec<u8>>,
    /// The zone's authoritative DNS server, asked for each answer before the ACME server is
    /// told to look (none: no check).
    pub dns: Option<SocketAddr>,
    /// The port ACME servers fetch HTTP-01 answers from (80): where the edges' plain HTTP
    /// listener is reached at a name's address.
    pub http_port: u16,
    /// The resolver asked for a name's address before an HTTP-01 answer is fetched there
    /// (none: the system's).
    pub resolver: Option<SocketAddr>,
}

/// How the ACME server is shown control of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solver {
    /// A TXT record in the zone, published by Portway's DNS server.
    Dns01,
    /// An HTTP answer from every edge, for a proven name outside the zone.
    Http01,
}

/// How `name` is answered for, given Portway's `zone`; why it cannot be otherwise.
///
/// # Errors
/// For a wildcard outside the zone: only DNS-01 can prove one, and its DNS is not ours.
pub fn solver(zone: &str, name: &str) -> Result<Solver, String> {
    let base = name.strip_prefix("*.").unwrap_or(name);
    if base == zone || base.ends_with(&format!(".{zone}")) {
        Ok(Solver::Dns01)
    } else if name.starts_with("*.") {
        Err(format!(
            "an ACME certificate for the wildcard {name} needs DNS-01 at {base}'s own DNS server; Portway answers DNS-01 only in its zone {zone}, and HTTP-01 only for exact names"
        ))
    } else {
        Ok(Solver::Http01)
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("acme::Config")
            .field("directory", &self.directory)
            .field("email", &self.email)
            .field("eab", &self.eab.as_ref().map(|(kid, _)| kid))
            .field("dns", &self.dns)
            .field("http_port", &self.http_port)
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

/// Name of the Secret holding the account credentials.
const ACCOUNT_SECRET: &str = "acme-account";
/// How long an order may take from ready challenges to a certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a published answer may take to show at the DNS server, or at the edges.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(30);

type Http = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

fn http_client(roots_pem: &[u8]) -> Result<Http, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem) {
        let cert = cert.map_err(|e| format!("reading the ACME directory's roots: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("an ACME directory root is not usable: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(HyperClient::builder(TokioExecutor::new()).build(https))
}

/// The issuer's side of ACME: an account, and orders answered over DNS-01.
pub struct Acme {
    config: Config,
    client: kube::Client,
    /// Held while the account is looked up or registered, so the zone's issuer and the
    /// devices' never register two accounts at once.
    account: tokio::sync::Mutex<Option<Account>>,
}

impl Acme {
    pub fn new(config: Config, client: kube::Client) -> Self {
        Self {
            config,
            client,
            account: tokio::sync::Mutex::new(None),
        }
    }

    pub fn directory(&self) -> &str {
        &self.config.directory
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, String> {
        match &self.config.directory_roots {
            Some(pem) => Ok(Account::builder_with_http(
                Box::new(http_client(pem)?) as Box<dyn HttpClient>
            )),
            None => Account::builder().map_err(|e| e.to_string()),
        }
    }

    /// The stored account for this directory, or a new one (then stored).
    async fn account(&self) -> Result<Account, String> {
        let mut cached = self.account.lock().await;
        if let Some(account) = &*cached {
            return Ok(account.clone());
        }
        let account = self.load_or_register().await?;
        *cached = Some(account.clone());
        Ok(account)
    }

    async fn load_or_register(&self) -> Result<Account, String> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        let stored = secrets
            .get_opt(ACCOUNT_SECRET)
            .await
            .map_err(|e| format!("reading Secret {SYSTEM_NAMESPACE}/{ACCOUNT_SECRET}: {e}"))?;
        let credentials = stored
            .as_ref()
            .and_then(|s| s.data.as_ref()?.get("credentials.json"))
            .and_then(|c| serde_json::from_slice::<AccountCredentials>(&c.0).ok())
            .filter(|c| {
                // Credentials name their directory; another directory needs a new account.
                serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v["directory"].as_str().map(str::to_owned))
                    .as_deref()
                    == Some(self.config.directory.as_str())
            });
        if let Some(credentials) = credentials {
            return self
                .builder()?
                .from_credentials(credentials)
                .await
                .map_err(|e| format!("restoring the ACME account: {}", chain(&e)));
        }
        let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = match &self.config.eab {
            Some((kid, hmac)) => {
                use base64::Engine as _;
                let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(hmac.trim_end_matches('='))
                    .map_err(|e| format!("--acme-eab-hmac is not base64url: {e}"))?;
                Some(ExternalAccountKey::new(kid.clone(), &key))
            }
            None => None,
        };
        let (account, credentials) = self
            .builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| format!("registering with {}: {}", self.config.directory, chain(&e)))?;
        let body = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
        let mut secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": ACCOUNT_SECRET, "namespace": SYSTEM_NAMESPACE,
                "labels": {portway_api::labels::MANAGED_BY: managers::OPERATOR}},
            "type": "Opaque",
        }))
        .map_err(|e| e.to_string())?;
        secret.data = Some([("credentials.json".to_owned(), ByteString(body))].into());
        secrets
            .patch(
                ACCOUNT_SECRET,
                &PatchParams::apply(managers::OPERATOR).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|e| format!("storing the ACME account: {e}"))?;
        tracing::info!(directory = %self.config.directory, "ACME account registered");
        Ok(account)
    }

    /// Orders a certificate for `hostnames` (each answered as [`solver`] says for
    /// `zone`); returns the chain and its new key (PEM). Published answers are removed
    /// whatever the outcome.
    pub async fn issue(
        &self,
        hostnames: &[String],
        zone: &str,
    ) -> Result<(String, String), String> {
        let (chain, key) = self.run_order(hostnames, zone, None).await?;
        Ok((chain, key.unwrap_or_default()))
    }

    /// Orders a certificate for a device's own request (its key stays on the device);
    /// returns the chain (PEM).
    pub async fn sign(
        &self,
        request: &portway_tls::csr::Request,
        zone: &str,
    ) -> Result<String, String> {
        let (chain, _) = self
            .run_order(&request.names, zone, Some(&request.der))
            .await?;
        Ok(chain)
    }

    async fn run_order(
        &self,
        hostnames: &[String],
        zone: &str,
        csr: Option<&[u8]>,
    ) -> Result<(String, Option<String>), String> {
        let account = self.account().await?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        let mut published = Vec::new();
        let result = self
            .order(&account, &secrets, hostnames, zone, csr, &mut published)
            .await;
        for name in published {
            if let Err(e) = secrets.delete(&name, &DeleteParams::default()).await {
                tracing::debug!(secret = %name, error = %e, "removing an ACME answer");
            }
        }
        result
    }

    async fn order(
        &self,
        account: &Account,
        secrets: &Api<Secret>,
        hostnames: &[String],
        zone: &str,
        csr: Option<&[u8]>,
        published: &mut Vec<String>,
    ) -> Result<(String, Option<String>), String> {
        let ids: Vec<Identifier> = hostnames
            .iter()
            .map(|h| Identifier::Dns(h.clone()))
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(|e| format!("creating the order: {}", chain(&e)))?;
        let mut answers = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz =
                authz.map_err(|e| format!("reading an authorization: {}", chain(&e)))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("an authorization is {other:?}")),
            }
            let (domain, wildcard) = match authz.identifier() {
                instant_acme::AuthorizedIdentifier {
                    identifier: Identifier::Dns(domain),
                    wildcard,
                    ..
                } => (domain.clone(), wildcard),
                _ => return Err("the ACME server asked about a non-DNS identifier".into()),
            };
            // Each name as it can be answered: one order may mix names in the zone and
            // proven names outside it (a device's passthrough names).
            let asked = if wildcard {
                format!("*.{domain}")
            } else {
                domain.clone()
            };
            let solver = solver(zone, &asked)?;
            let kind = match solver {
                Solver::Dns01 => ChallengeType::Dns01,
                Solver::Http01 => ChallengeType::Http01,
            };
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                format!("the ACME server offers no {kind:?} challenge for {domain}")
            })?;
            let answer = match solver {
                Solver::Dns01 => {
                    let record = format!("_acme-challenge.{domain}");
                    let value = challenge.key_authorization().dns_value();
                    let name = format!("acme-challenge-{}", published.len());
                    publish(secrets, &name, (RECORD, &record), ("txt", &value)).await?;
                    published.push(name);
                    self.propagated(&record, &value).await?;
                    record
                }
                Solver::Http01 => {
                    let key_authorization = challenge.key_authorization().as_str().to_owned();
                    let path = format!("{HTTP01_PATH}{}", challenge.token);
                    let name = format!("acme-http01-{}", published.len());
                    let data = ("key-authorization", key_authorization.as_str());
                    publish(secrets, &name, (HTTP01_HOST, &domain), data).await?;
                    published.push(name);
                    self.served(&domain, &path, &key_authorization).await?
                }
            };
            challenge
                .set_ready()
                .await
                .map_err(|e| format!("answering the challenge at {answer}: {}", chain(&e)))?;
            answers.push(answer);
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(ORDER_TIMEOUT);
        let status = order
            .poll_ready(&policy)
            .await
            .map_err(|e| format!("waiting for the order: {}", chain(&e)))?;
        if status != OrderStatus::Ready {
            let why = order_problem(&mut order).await;
            return Err(format!(
                "the order is {status:?} after answering {}: {why}",
                answers.join(", ")
            ));
        }
        let key = match csr {
            Some(der) => {
                order.finalize_csr(der).await.map_err(|e| {
                    format!(
                        "finalizing the order with the device's request: {}",
                        chain(&e)
                    )
                })?;
                None
            }
            None => Some(
                order
                    .finalize()
                    .await
                    .map_err(|e| format!("finalizing the order: {}", chain(&e)))?,
            ),
        };
        let chain = order
            .poll_certificate(&policy)
            .await
            .map_err(|e| format!("downloading the certificate: {}", chain(&e)))?;
        Ok((chain, key))
    }

    /// Waits until the zone's DNS server answers `record` with `value`.
    async fn propagated(&self, record: &str, value: &str) -> Result<(), String> {
        let Some(server) = self.config.dns else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + PROPAGATION_TIMEOUT;
        let mut delay = Duration::from_millis(20);
        loop {
            let values = crate::dns::ask(server, record, RecordType::TXT)
                .await
                .map(|a| a.txt);
            match values {
                Ok(values) if values.iter().any(|v| v == value) => return Ok(()),
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {}
                Ok(values) => {
                    return Err(format!(
                        "{server} did not publish {record} within {PROPAGATION_TIMEOUT:?} (it answers {values:?})"
                    ));
                }
                Err(e) => return Err(format!("asking {server} for {record}: {e}")),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

impl Acme {
    /// Waits until the edges answer `http://<domain><path>` with `key_authorization` at
    /// the address the ACME server will find for `domain`; returns that URL.
    async fn served(
        &self,
        domain: &str,
        path: &str,
        key_authorization: &str,
    ) -> Result<String, String> {
        let port = self.config.http_port;
        let url = if port == 80 {
            format!("http://{domain}{path}")
        } else {
            format!("http://{domain}:{port}{path}")
        };
        let client =
            HyperClient::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
        let deadline = tokio::time::Instant::now() + PROPAGATION_TIMEOUT;
        let mut delay = Duration::from_millis(20);
        loop {
            let found = match self.addresses(domain).await {
                Ok(addrs) => fetch(&client, &addrs, port, domain, path).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(body) if body.trim_end() == key_authorization => return Ok(url),
                _ if tokio::time::Instant::now() < deadline => {}
                Ok(body) => {
                    return Err(format!(
                        "{url} does not serve the HTTP-01 answer within {PROPAGATION_TIMEOUT:?} (it answers {:?}): does {domain} point at an edge, listening on port {port}?",
                        body.chars().take(200).collect::<String>()
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "{url} does not serve the HTTP-01 answer within {PROPAGATION_TIMEOUT:?}: {e}"
                    ));
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// `domain`'s addresses, from the configured resolver or the system's.
    async fn addresses(&self, domain: &str) -> Result<Vec<IpAddr>, String> {
        let addrs = match self.config.resolver {
            Some(server) => {
                let mut addrs = Vec::new();
                for rtype in [RecordType::A, RecordType::AAAA] {
                    addrs.extend(crate::dns::ask(server, domain, rtype).await?.addrs);
                }
                addrs
            }
            None => tokio::net::lookup_host((domain, self.config.http_port))
                .await
                .map_err(|e| format!("resolving {domain}: {e}"))?
                .map(|a| a.ip())
                .collect(),
        };
        if addrs.is_empty() {
            return Err(format!("{domain} has no address"));
        }
        Ok(addrs)
    }

    /// Revokes a certificate this directory issued (`chain_pem`, leaf first): its key is
    /// about to be deleted, and nothing should trust it any more.
    pub async fn revoke(&self, chain_pem: &[u8]) -> Result<(), String> {
        let leaf = CertificateDer::pem_slice_iter(chain_pem)
            .next()
            .ok_or("no certificate")?
            .map_err(|e| format!("not a certificate: {e}"))?;
        let account = self.account().await?;
        account
            .revoke(&RevocationRequest {
                certificate: &leaf,
                reason: Some(RevocationReason::CessationOfOperation),
            })
            .await
            .map_err(|e| format!("revoking at {}: {}", self.config.directory, chain(&e)))
    }
}

/// The body `GET http://<domain><path>` answers at the first of `addrs` that answers.
async fn fetch(
    client: &HyperClient<HttpConnector, http_body_util::Empty<Bytes>>,
    addrs: &[IpAddr],
    port: u16,
    domain: &str,
    path: &str,
) -> Result<String, String> {
    use http_body_util::BodyExt as _;
    let mut last = String::new();
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        let request = hyper::Request::get(format!("http://{addr}{path}"))
            .header(hyper::header::HOST, domain)
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(5), async {
            let response = client.request(request).await.map_err(|e| chain(&e))?;
            let status = response.status();
            // An answer is a hundred bytes; a page in its place is cut short.
            let body = http_body_util::Limited::new(response.into_body(), 4096)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, body))
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()));
        match response {
            Ok((status, body)) if status.is_success() => {
                return Ok(String::from_utf8_lossy(&body).into_owned());
            }
            Ok((status, body)) => {
                last = format!(
                    "{addr} answers {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// An error with its causes: a bare "client error (Connect)" hides the TLS reason.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What the ACME server said went wrong with an order's authorizations.
async fn order_problem(order: &mut instant_acme::Order) -> String {
    let mut problems = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        for c in &authz.challenges {
            if let Some(e) = &c.error {
                problems.push(format!("{}: {e}", authz.identifier()));
            }
        }
    }
    if problems.is_empty() {
        "no reason given".into()
    } else {
        problems.join("; ")
    }
}

/// Publishes an answer: a challenge Secret with one annotation (what it is for) and one
/// data key (the answer).
async fn publish(
    secrets: &Api<Secret>,
    name: &str,
    (annotation, subject): (&str, &str),
    (key, value): (&str, &str),
) -> Result<(), String> {
    let mut secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE,
            "labels": {CHALLENGE_LABEL: "true", portway_api::labels::MANAGED_BY: managers::OPERATOR},
            "annotations": {annotation: subject}},
        "type": "Opaque",
    }))
    .map_err(|e| e.to_string())?;
    secret.data = Some([(key.to_owned(), ByteString(value.as_bytes().to_vec()))].into());
    secrets
        .patch(
            name,
            &PatchParams::apply(managers::OPERATOR).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| format!("publishing the answer for {subject}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_names_use_dns01_others_http01_and_foreign_wildcards_neither() {
        let zone = "portway.example";
        assert_eq!(solver(zone, "*.portway.example"), Ok(Solver::Dns01));
        assert_eq!(solver(zone, "a.portway.example"), Ok(Solver::Dns01));
        assert_eq!(solver(zone, "portway.example"), Ok(Solver::Dns01));
        assert_eq!(solver(zone, "shop.test"), Ok(Solver::Http01));
        assert_eq!(solver(zone, "notportway.example"), Ok(Solver::Http01));
        let err = solver(zone, "*.shop.test").unwrap_err();
        assert!(err.contains("DNS-01") && err.contains("shop.test"), "{err}");
    }
}
