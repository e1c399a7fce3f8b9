//! ACME HTTP-01 answers. For a proven name outside the zone, the operator's issuer
//! publishes each answer as a challenge Secret
//! ([`portway_api::certificates::http01_answer`]); every edge watches them and answers
//! plain-HTTP `GET /.well-known/acme-challenge/<token>` for that name while the order is
//! open: the built-in edge before any route or redirect, Envoy by a direct response
//! ([`crate::xds::render`]). Whichever edge the ACME server reaches, it finds the answer.

use std::sync::Arc;

use arc_swap::ArcSwap;
use kube::Api;
use portway_api::certificates::{CHALLENGE_LABEL, Http01, SYSTEM_NAMESPACE, http01_answer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The answers currently published, swapped whole on each change.
pub type Answers = Arc<ArcSwap<Vec<Http01>>>;

/// The answer to `GET path` at `host` (a Host header: a port is ignored), if any.
pub fn answer<'a>(answers: &'a [Http01], host: &str, path: &str) -> Option<&'a Http01> {
    let token = path.strip_prefix(portway_api::certificates::HTTP01_PATH)?;
    let host = crate::edge::host_name(host).trim_end_matches('.');
    answers
        .iter()
        .find(|a| a.token == token && a.host.eq_ignore_ascii_case(host))
}

/// Watches the challenge Secrets until `shutdown`, handing every current HTTP-01 answer to
/// `changed` after each change (DNS-01 answers are the DNS server's).
pub fn watch(
    client: kube::Client,
    changed: impl Fn(Vec<Http01>) + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, SYSTEM_NAMESPACE);
    crate::certs::watch_labelled(
        api,
        &format!("{CHALLENGE_LABEL}=true"),
        move |secrets| changed(secrets.iter().filter_map(|s| http01_answer(s)).collect()),
        shutdown,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_for_its_host_and_token_only() {
        let answers = vec![Http01 {
            host: "shop.test".into(),
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        }];
        let path = "/.well-known/acme-challenge/tok";
        assert!(answer(&answers, "Shop.Test:8080", path).is_some());
        assert!(answer(&answers, "shop.test.", path).is_some());
        assert!(answer(&answers, "other.test", path).is_none());
        assert!(answer(&answers, "shop.test", "/.well-known/acme-challenge/other").is_none());
        assert!(answer(&answers, "shop.test", "/tok").is_none());
    }
}
