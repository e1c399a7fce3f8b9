//! AccessPolicies: which one guards each HTTPProxy (the proxy's HTTPRoute then names it
//! in an `ExtensionRef` filter on every rule, which the data planes enforce), and each
//! policy's status per target. The decisions are pure; `reconcile` reads and writes.

use std::sync::Arc;

use gateway_api::apis::standard::httproutes::{
    HttpRouteRulesFilters, HttpRouteRulesFiltersExtensionRef, HttpRouteRulesFiltersType,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use portway_api::access::{GROUP, KIND, TARGET_KIND};
use portway_api::{
    AccessPolicy, AccessPolicyStatus, HttpProxy, PolicyAncestorStatus, PolicyTargetReference,
    Validate, condition_at,
};
use serde_json::json;

use crate::{Ctx, Error};

pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const INVALID: &str = "Invalid";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const CONFLICTED: &str = "Conflicted";
    /// The condition type, and its reason when True.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const INVALID_SECRET: &str = "InvalidSecret";
}

/// The Secret a policy reads, if any: its rule, the Secret's name and type.
pub fn secret_ref(policy: &AccessPolicy) -> Option<(&'static str, &str, &'static str)> {
    use portway_api::access::{HTPASSWD_TYPE, JWKS_TYPE, OIDC_CLIENT_TYPE};
    if let Some(b) = &policy.spec.basic_auth {
        return Some(("basicAuth", &b.secret_ref.name, HTPASSWD_TYPE));
    }
    if let Some(o) = &policy.spec.oidc {
        return Some(("oidc", &o.client_secret_ref.name, OIDC_CLIENT_TYPE));
    }
    let r = policy.spec.jwt.as_ref()?.jwks.secret_ref.as_ref()?;
    Some(("jwt", &r.name, JWKS_TYPE))
}

/// Whether the Secret the policy names (basic auth users, or JWT keys) is usable:
/// `ResolvedRefs` (status, reason, message), or `None` for a policy that names none. A
/// policy whose Secret is missing or wrong stays attached, and its routes answer 500:
/// never open.
pub fn resolved_refs(
    policy: &AccessPolicy,
    secret: Option<&Secret>,
) -> Option<(bool, &'static str, String)> {
    let (rule, name, kind) = secret_ref(policy)?;
    let ns = policy.namespace().unwrap_or_default();
    let closed = "; its proxies answer 500 until it is fixed";
    let Some(secret) = secret.filter(|s| s.type_.as_deref() == Some(kind)) else {
        return Some((
            false,
            reasons::SECRET_NOT_FOUND,
            format!("{rule}: no Secret {ns}/{name} of type {kind}{closed}"),
        ));
    };
    let errors = secret.validate();
    let holds = if rule == "basicAuth" {
        portway_api::access::htpasswd_text(secret)
            .and_then(|t| portway_api::access::htpasswd(&t).ok().map(|u| u.len()))
            .map(|n| format!("{n} user(s)"))
    } else if rule == "oidc" {
        portway_api::access::oidc_client_secret(secret)
            .filter(|s| !s.is_empty())
            .map(|_| "the client's secret".to_owned())
    } else {
        portway_api::access::jwks_text(secret)
            .and_then(|t| portway_api::access::jwks(&t).ok())
            .map(|n| format!("{n} key(s)"))
    };
    Some(match (errors.is_empty(), holds) {
        (true, Some(n)) => (
            true,
            reasons::RESOLVED_REFS,
            format!("Secret {ns}/{name} holds {n}"),
        ),
        (_, holds) => (
            false,
            reasons::INVALID_SECRET,
            format!(
                "{rule}: Secret {ns}/{name}: {}{closed}",
                if errors.is_empty() && holds.is_none() {
                    "holds nothing usable".to_owned()
                } else {
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            ),
        ),
    })
}

/// The policy that guards `proxy` among `policies` (its namespace's): the oldest one
/// naming it, so a newer policy can never loosen or replace one in force. An invalid one
/// (stored before a rule existed, or around the API server) still guards: the data
/// planes cannot compile it and answer 500, which is closed, where skipping it would open
/// the proxy or hand it to a newer, looser policy. A policy a device wrote (labelled
/// with its connector) is not even considered for a proxy of another connector.
pub fn guarding<'a>(proxy: &HttpProxy, policies: &[&'a AccessPolicy]) -> Option<&'a AccessPolicy> {
    let name = proxy.name_any();
    policies
        .iter()
        .copied()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .target_refs
                .iter()
                .any(|t| t.name == name && t.kind == TARGET_KIND && t.group == GROUP)
        })
        .filter(|p| may_guard(p, proxy))
        .min_by(|a, b| {
            let at = |p: &AccessPolicy| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            at(a)
                .cmp(&at(b))
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        })
}

/// Whether `policy` may guard `proxy` at all: any policy may, unless a device wrote it
/// (labelled `portway.dev/connector`), when every backend of the proxy must name that
/// connector.
pub fn may_guard(policy: &AccessPolicy, proxy: &HttpProxy) -> bool {
    let Some(connector) = policy.labels().get(portway_api::access::CONNECTOR_LABEL) else {
        return true;
    };
    let mut backends = proxy.spec.rules.iter().flat_map(|r| &r.backends).peekable();
    backends.peek().is_some()
        && backends.all(|b| {
            b.connector
                .as_ref()
                .is_some_and(|c| c.name.as_deref() == Some(connector.as_str()))
        })
}

/// The policy the proxy's routes name: the one guarding it; or, while none does and its
/// `portway.dev/access-policy` annotation asks for one, [`UNGUARDED`], which no policy can
/// be named, so its routes answer 500. Never the annotated name itself: a policy of that
/// name written by someone else (a device squatting `<proxy>-access`) must not guard it.
pub fn route_policy(proxy: &HttpProxy, policies: &[&AccessPolicy]) -> Option<String> {
    guarding(proxy, policies)
        .map(ResourceExt::name_any)
        .or_else(|| {
            proxy
                .annotations()
                .contains_key(portway_api::access::POLICY_ANNOTATION)
                .then(|| UNGUARDED.to_owned())
        })
}

/// What a proxy waiting for its policy names instead: not a DNS name, so no AccessPolicy
/// has it, and the data planes refuse the route (500).
pub const UNGUARDED: &str = "portway:awaiting-policy";

/// The filter the proxy's route carries on every rule to name its policy.
pub fn filter(policy: &str) -> HttpRouteRulesFilters {
    HttpRouteRulesFilters {
        r#type: HttpRouteRulesFiltersType::ExtensionRef,
        extension_ref: Some(HttpRouteRulesFiltersExtensionRef {
            group: GROUP.into(),
            kind: KIND.into(),
            name: policy.into(),
        }),
        ..Default::default()
    }
}

/// The policy's status: per target, `Accepted` when it guards that proxy, or why not.
pub fn status(
    policy: &AccessPolicy,
    proxies: &[&HttpProxy],
    policies: &[&AccessPolicy],
    secret: Option<&Secret>,
    controller: &str,
    now: Timestamp,
) -> AccessPolicyStatus {
    let refs = resolved_refs(policy, secret);
    let generation = policy.metadata.generation;
    let name = policy.name_any();
    let invalid: Vec<String> = policy.validate().iter().map(ToString::to_string).collect();
    let ancestors = policy
        .spec
        .target_refs
        .iter()
        .map(|t| {
            let (ok, reason, message) = if !invalid.is_empty() {
                (
                    false,
                    reasons::INVALID,
                    format!(
                        "{}; the proxies it names answer 500 until it is fixed or deleted",
                        invalid.join("; ")
                    ),
                )
            } else if let Some(proxy) = proxies
                .iter()
                .find(|p| p.name_any() == t.name)
                .filter(|p| !may_guard(policy, p))
            {
                (
                    false,
                    reasons::TARGET_NOT_FOUND,
                    format!(
                        "HTTPProxy {:?} is not of connector {:?}: a device's policy guards only its own proxies",
                        proxy.name_any(),
                        policy
                            .labels()
                            .get(portway_api::access::CONNECTOR_LABEL)
                            .map_or("", String::as_str)
                    ),
                )
            } else if let Some(proxy) = proxies.iter().find(|p| p.name_any() == t.name) {
                match guarding(proxy, policies) {
                    Some(p) if p.name_any() == name => (
                        true,
                        reasons::ACCEPTED,
                        format!("guards HTTPProxy {:?}", t.name),
                    ),
                    Some(p) => (
                        false,
                        reasons::CONFLICTED,
                        format!(
                            "HTTPProxy {:?} is guarded by the older AccessPolicy {:?}; a proxy takes one policy",
                            t.name,
                            p.name_any()
                        ),
                    ),
                    // Not reached: this policy is valid and names the proxy.
                    None => (false, reasons::CONFLICTED, "not attached".to_owned()),
                }
            } else {
                (
                    false,
                    reasons::TARGET_NOT_FOUND,
                    format!("no HTTPProxy {:?} in this namespace", t.name),
                )
            };
            PolicyAncestorStatus {
                ancestor_ref: PolicyTargetReference {
                    group: GROUP.into(),
                    kind: TARGET_KIND.into(),
                    name: t.name.clone(),
                    section_name: None,
                },
                controller_name: controller.to_owned(),
                conditions: std::iter::once(condition_at(
                    "Accepted", ok, reason, message, generation, now,
                ))
                .chain(refs.clone().map(|(ok, reason, message)| {
                    condition_at(
                        reasons::RESOLVED_REFS,
                        ok,
                        reason,
                        message,
                        generation,
                        now,
                    )
                }))
                .collect(),
            }
        })
        .collect();
    AccessPolicyStatus { ancestors }
}

/// Writes the policy's status as decided (transition times kept where unchanged), with an
/// Event per target whose conditions changed.
pub(crate) async fn reconcile(policy: Arc<AccessPolicy>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if policy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = policy.namespace().unwrap_or_default();
    let proxies = ctx.proxies.get(&ns);
    let policies = ctx.access.get(&ns);
    let proxy_refs: Vec<&HttpProxy> = proxies.iter().map(AsRef::as_ref).collect();
    let policy_refs: Vec<&AccessPolicy> = policies.iter().map(AsRef::as_ref).collect();
    let secret = secret_ref(&policy).and_then(|(_, name, kind)| {
        let store = match kind {
            portway_api::access::HTPASSWD_TYPE => &ctx.htpasswd,
            portway_api::access::OIDC_CLIENT_TYPE => &ctx.oidc_clients,
            _ => &ctx.jwks,
        };
        store.get(&ObjectRef::new(name).within(&ns))
    });
    let mut decided = status(
        &policy,
        &proxy_refs,
        &policy_refs,
        secret.as_deref(),
        &ctx.config.proxy.controller_name,
        Timestamp::now(),
    );
    let current = policy.status.clone().unwrap_or_default();
    for a in &mut decided.ancestors {
        let old = current
            .ancestors
            .iter()
            .find(|o| o.ancestor_ref == a.ancestor_ref)
            .map(|o| o.conditions.as_slice())
            .unwrap_or_default();
        a.conditions = crate::proxy::desired::merged_conditions(old, &a.conditions);
    }
    let before = current.clone();
    let after = decided.clone();
    crate::proxy::reconcile::write_status(&ctx, &*policy, &[], &[], move |_| {
        (decided != current).then(|| json!(decided))
    })
    .await?;
    for a in &after.ancestors {
        let old = before
            .ancestors
            .iter()
            .find(|o| o.ancestor_ref == a.ancestor_ref)
            .map(|o| o.conditions.as_slice())
            .unwrap_or_default();
        ctx.events
            .conditions_changed(
                &kube::Resource::object_ref(&*policy, &()),
                old,
                &a.conditions,
            )
            .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn policy(name: &str, age: i64, targets: &[&str]) -> AccessPolicy {
        let mut p: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.datumapis.com/v1alpha", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": "p", "generation": 1},
            "spec": {"targetRefs": targets.iter().map(|t| json!({"group": GROUP, "kind": TARGET_KIND, "name": t})).collect::<Vec<_>>(),
                     "methods": ["GET"]},
        }))
        .unwrap();
        p.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(1_700_000_000 + age).unwrap()));
        p
    }

    fn proxy(name: &str) -> HttpProxy {
        serde_json::from_value(json!({
            "apiVersion": "networking.datumapis.com/v1alpha", "kind": "HTTPProxy",
            "metadata": {"name": name, "namespace": "p"},
            "spec": {"rules": []},
        }))
        .unwrap()
    }

    fn accepted(s: &AccessPolicyStatus) -> Vec<(String, String, String)> {
        s.ancestors
            .iter()
            .map(|a| {
                let c = &a.conditions[0];
                (
                    a.ancestor_ref.name.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn the_oldest_policy_guards_a_proxy_even_if_invalid_and_others_are_conflicted() {
        let old = policy("old", 0, &["app"]);
        let new = policy("new", 10, &["app", "api"]);
        let mut broken = policy("broken", -10, &["app"]);
        broken.spec.methods = vec!["get".into()];
        let all = [&old, &new, &broken];
        // Invalid but oldest: it keeps the proxy (closed: 500), no newer one takes over.
        let g =
            |name: &str, list: &[&AccessPolicy]| guarding(&proxy(name), list).map(|p| p.name_any());
        assert_eq!(g("app", &all).unwrap(), "broken");
        assert_eq!(g("app", &[&old, &new]).unwrap(), "old");
        assert_eq!(g("api", &all).unwrap(), "new");
        assert!(g("web", &all).is_none());

        let (app, api) = (proxy("app"), proxy("api"));
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let s = |p: &AccessPolicy| accepted(&status(p, &[&app, &api], &all, None, "c", now));
        let row = |n: &str, st: &str, r: &str| (n.to_owned(), st.to_owned(), r.to_owned());
        assert_eq!(s(&old), [row("app", "False", reasons::CONFLICTED)]);
        assert_eq!(
            s(&new),
            [
                row("app", "False", reasons::CONFLICTED),
                row("api", "True", reasons::ACCEPTED)
            ]
        );
        assert_eq!(s(&broken), [row("app", "False", reasons::INVALID)]);
        let lonely = policy("lonely", 0, &["gone"]);
        assert_eq!(
            accepted(&status(&lonely, &[&app], &[&lonely], None, "c", now)),
            [row("gone", "False", reasons::TARGET_NOT_FOUND)]
        );
    }

    #[test]
    fn basic_auth_says_whether_its_secret_holds_users() {
        let mut p = policy("p", 0, &["app"]);
        p.spec.basic_auth = Some(portway_api::BasicAuth {
            secret_ref: portway_api::SecretRef {
                name: "users".into(),
            },
            realm: None,
        });
        let secret = |text: &str| -> Secret {
            serde_json::from_value(json!({
                "metadata": {"name": "users", "namespace": "p"}, "type": "portway.dev/htpasswd",
                "stringData": {"htpasswd": text},
            }))
            .unwrap()
        };
        let bcrypt = "$2y$05$abcdefghijklmnopqrstuuLBHxAyqSvrL8Q0zCD0Q26c1Y9VTn3NG";
        let good = secret(&format!("ann:{bcrypt}\n"));
        assert_eq!(
            resolved_refs(&p, Some(&good)).unwrap().1,
            reasons::RESOLVED_REFS
        );
        assert_eq!(
            resolved_refs(&p, None).unwrap().1,
            reasons::SECRET_NOT_FOUND
        );
        let plain = secret("ann:hunter2\n");
        let (ok, reason, message) = resolved_refs(&p, Some(&plain)).unwrap();
        assert_eq!((ok, reason), (false, reasons::INVALID_SECRET));
        assert!(!message.contains("hunter2"), "{message}");
        // Refused Secret or not, the policy still guards its proxy (fails closed).
        assert_eq!(guarding(&proxy("app"), &[&p]).unwrap().name_any(), "p");
        assert!(resolved_refs(&policy("q", 0, &["app"]), None).is_none());
    }

    #[test]
    fn a_deleted_policy_guards_nothing() {
        let mut p = policy("p", 0, &["app"]);
        p.metadata.deletion_timestamp = p.metadata.creation_timestamp.clone();
        assert!(guarding(&proxy("app"), &[&p]).is_none());
    }

    #[test]
    fn a_devices_policy_guards_only_its_connectors_proxies() {
        let of = |name: &str, connector: &str| -> HttpProxy {
            serde_json::from_value(json!({
                "apiVersion": "networking.datumapis.com/v1alpha", "kind": "HTTPProxy",
                "metadata": {"name": name, "namespace": "p",
                    "annotations": {"portway.dev/access-policy": format!("{name}-access")}},
                "spec": {"rules": [{"backends": [
                    {"endpoint": "http://127.0.0.1:1", "connector": {"name": connector}}]}]},
            }))
            .unwrap()
        };
        let mut b = policy("b-access", -10, &["web"]);
        b.metadata.labels = Some([("portway.dev/connector".to_owned(), "b".to_owned())].into());
        // Device b's older policy names "web", now device a's proxy: it guards nothing
        // there, the proxy waits for its own (a name no policy has: 500), and b's says why.
        let web_of_a = of("web", "a");
        assert!(guarding(&web_of_a, &[&b]).is_none());
        assert_eq!(route_policy(&web_of_a, &[&b]).as_deref(), Some(UNGUARDED));
        // Nor does a policy that merely has the annotated name (a squatter's).
        let mut squat = policy("web-access", -20, &["elsewhere"]);
        squat.metadata.labels = b.metadata.labels.clone();
        assert_eq!(
            route_policy(&web_of_a, &[&squat]).as_deref(),
            Some(UNGUARDED)
        );
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let s = accepted(&status(&b, &[&web_of_a], &[&b], None, "c", now));
        assert_eq!(s[0].2, reasons::TARGET_NOT_FOUND);
        // Its own proxy it guards; an admin's policy (no label) guards either.
        assert_eq!(
            route_policy(&of("web", "b"), &[&b]).as_deref(),
            Some("b-access")
        );
        let admin = policy("admin", 0, &["web"]);
        assert_eq!(
            route_policy(&web_of_a, &[&b, &admin]).as_deref(),
            Some("admin")
        );
        assert!(route_policy(&proxy("web"), &[]).is_none());
    }
}
