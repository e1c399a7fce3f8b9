//! Small, bounded HTTP calls the data planes make for AccessPolicies: an issuer's JWKS and
//! OpenID configuration, and its token endpoint. Answers are capped in size and time, no
//! redirect is followed, and `http://` is taken only where admission allowed it (a
//! loopback address).

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

/// The largest answer read.
pub const MAX_BYTES: usize = 1 << 20;
/// How long a call may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

static CLIENT: LazyLock<Result<Https, String>> = LazyLock::new(|| {
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
});

/// GETs `url` (JSON expected).
///
/// # Errors
/// A sentence: the URL refused, the call failed or timed out, a status other than 200,
/// or an answer over [`MAX_BYTES`]. Never the answer's body.
pub async fn get(url: &str) -> Result<Vec<u8>, String> {
    get_as(url, None).await
}

/// [`get`] with an `Authorization` header (a provider's userinfo endpoint).
///
/// # Errors
/// As [`get`].
pub async fn get_as(url: &str, authorization: Option<&str>) -> Result<Vec<u8>, String> {
    let mut req = http::Request::get(url).header(http::header::ACCEPT, "application/json");
    if let Some(a) = authorization {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let req = req.body(Full::default()).map_err(|e| e.to_string())?;
    send(url, req).await
}

/// POSTs a form to `url` (an OAuth token endpoint) and reads the JSON answer, whatever
/// its status (OAuth errors come as 400 with a JSON body).
///
/// # Errors
/// As [`get`], except for the status.
pub async fn post_form(
    url: &str,
    form: &[(&str, &str)],
    authorization: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut req = http::Request::post(url)
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        );
    if let Some(a) = authorization {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    call(url, req).await
}

async fn send(url: &str, req: http::Request<Full<Bytes>>) -> Result<Vec<u8>, String> {
    match call(url, req).await? {
        (200, body) => Ok(body),
        (status, _) => Err(format!("status {status}")),
    }
}

async fn call(url: &str, req: http::Request<Full<Bytes>>) -> Result<(u16, Vec<u8>), String> {
    portway_api::access::fetch_url(url)?;
    let client = CLIENT.as_ref().map_err(Clone::clone)?;
    let work = async {
        let resp = client.request(req).await.map_err(|e| format!("{e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok((status, body.to_bytes().to_vec()))
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer in {} s", TIMEOUT.as_secs()))?
}
