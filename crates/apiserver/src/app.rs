//! What the REST handlers and watch streams share: the server's state and a request's
//! query parameters.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;
use crate::devices::Devices;
use crate::error::Result;
use crate::registry::Res;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::Store;

pub struct App {
    pub store: Store,
    pub tokens: Tokens,
    pub devices: Arc<Devices>,
    /// `host:port` clients reach us at, for `/api`'s `serverAddressByClientCIDRs`.
    pub address: String,
    pub max_body: usize,
    /// When this process started serving (RFC 3339): the creation time of what it serves
    /// without storing, the CustomResourceDefinitions.
    pub started: String,
    pub shutdown: CancellationToken,
}

pub type Query = HashMap<String, String>;

pub fn parse_query(q: Option<&str>) -> Query {
    url::form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

pub fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

/// The `labelSelector` and `fieldSelector` of a request.
///
/// # Errors
/// 400 when either does not parse.
pub fn selectors(q: &Query, res: Res) -> Result<(LabelSelector, FieldSelector)> {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    Ok((
        LabelSelector::parse(get("labelSelector"))?,
        FieldSelector::parse(get("fieldSelector"), res)?,
    ))
}
