//! `SelfSubjectAccessReview` (`kubectl auth can-i`) and `SelfSubjectReview` (`kubectl auth
//! whoami`): what the caller may do, answered by [`authorize`], and who the caller is.

use std::collections::BTreeMap;

use axum::extract::Request;
use axum::response::Response;
use http::{Method, StatusCode};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, SelfSubjectReviewStatus, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SelfSubjectAccessReview, SubjectAccessReviewStatus,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::body::read_object;
use super::json_response;
use crate::app::App;
use crate::auth::{Access, Namespaces, User, Verb, allowing_roles, authorize};
use crate::discovery;
use crate::error::{ApiError, Result};
use crate::protobuf;
use crate::registry::{Res, registry};
use crate::write::{FieldValidation, check_type_meta};

/// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`.
pub(super) async fn access(app: &App, user: &User, req: Request) -> Result<Response> {
    let mut review: SelfSubjectAccessReview = read_review(
        app,
        req,
        &protobuf::SELF_SUBJECT_ACCESS_REVIEW,
        "authorization.k8s.io/v1",
        "SelfSubjectAccessReview",
    )
    .await?;
    let spec = &review.spec;
    let (allowed, reason) = match (&spec.resource_attributes, &spec.non_resource_attributes) {
        (Some(r), None) => resource_access(user, r),
        (None, Some(n)) => non_resource_access(n),
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "SelfSubjectAccessReview.authorization.k8s.io \"\" is invalid: spec: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
            ));
        }
    };
    review.status = Some(SubjectAccessReviewStatus {
        allowed,
        reason: Some(reason),
        ..Default::default()
    });
    created(&review)
}

/// `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`: the user's name, its roles
/// as groups, and the namespaces it is confined to.
pub(super) async fn whoami(app: &App, user: &User, req: Request) -> Result<Response> {
    let mut review: SelfSubjectReview = read_review(
        app,
        req,
        &protobuf::SELF_SUBJECT_REVIEW,
        "authentication.k8s.io/v1",
        "SelfSubjectReview",
    )
    .await?;
    let namespaces = match &user.namespaces {
        Namespaces::All => vec!["*".to_owned()],
        Namespaces::Only(list) => list.clone(),
    };
    review.status = Some(SelfSubjectReviewStatus {
        user_info: Some(UserInfo {
            username: Some(user.name.clone()),
            groups: Some(user.roles.iter().map(|r| r.as_str().to_owned()).collect()),
            extra: Some(BTreeMap::from([(
                "portway.dev/namespaces".to_owned(),
                namespaces,
            )])),
            uid: None,
        }),
    });
    created(&review)
}

/// Reads a review from a JSON, YAML or protobuf body. A review stores nothing, so fields
/// it does not know are ignored, as Kubernetes does by default.
async fn read_review<T: DeserializeOwned>(
    app: &App,
    req: Request,
    message: &'static protobuf::Message,
    api_version: &str,
    kind: &str,
) -> Result<T> {
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource: {kind} only supports create"
        )));
    }
    let mut body = read_object(app, req, Some(message), FieldValidation::Ignore).await?;
    check_type_meta(api_version, kind, &mut body)?;
    serde_json::from_value(body).map_err(|e| ApiError::bad_request(format!("{kind}: {e}")))
}

fn created(review: &impl Serialize) -> Result<Response> {
    let v = serde_json::to_value(review)
        .map_err(|e| ApiError::internal(format!("encoding the review: {e}")))?;
    Ok(json_response(StatusCode::CREATED, &v))
}

/// Whether `user` may do what `r` describes, as the same request would be authorised,
/// and why. A `*` verb means every verb; a `*` group or resource every kind stored here.
fn resource_access(user: &User, r: &ResourceAttributes) -> (bool, String) {
    fn get(o: &Option<String>) -> &str {
        o.as_deref().unwrap_or_default()
    }
    let (verb, group, resource) = (get(&r.verb), get(&r.group), get(&r.resource));
    let (subresource, ns, name) = (get(&r.subresource), get(&r.namespace), get(&r.name));
    if let Some(f) = discovery::fixed(group, resource) {
        // Served to every user, with the verbs discovery lists.
        return if f.verbs.contains(&verb) {
            (true, format!("every user may {verb} {resource}.{group}"))
        } else {
            (
                false,
                format!("{resource}.{group} only support {}", f.verbs.join(", ")),
            )
        };
    }
    let verbs: Vec<Verb> = match verb {
        "*" => Verb::ALL.to_vec(),
        v => match Verb::parse(v) {
            Some(v) => vec![v],
            None => return (false, format!("no verb {v:?} is served here")),
        },
    };
    let kinds: Vec<Res> = registry()
        .all()
        .filter(|t| (group == "*" || t.group == group) && (resource == "*" || t.plural == resource))
        .collect();
    if kinds.is_empty() {
        return (
            false,
            format!("no resource {resource:?} in API group {group:?} is served here"),
        );
    }
    match subresource {
        "" => {}
        "status" if kinds.iter().all(|t| t.status) => {}
        other => {
            return (
                false,
                format!("no subresource {other:?} of {resource:?} is served here"),
            );
        }
    }
    let mut roles: Vec<&str> = Vec::new();
    for res in kinds {
        // As `resource` in the HTTP layer: a Namespace is authorised by its own name.
        let scope = if res.kind == "Namespace" {
            Some(name)
        } else if res.namespaced {
            Some(ns)
        } else {
            None
        };
        let scope = scope.filter(|s| !s.is_empty());
        for &verb in &verbs {
            let access = Access {
                verb,
                res,
                ns: scope,
                status: subresource == "status",
            };
            let allowing = allowing_roles(user, &access);
            if allowing.is_empty() {
                let why = authorize(user, &access).err().map(|e| e.message);
                return (false, why.unwrap_or_default());
            }
            for role in allowing {
                if !roles.contains(&role.as_str()) {
                    roles.push(role.as_str());
                }
            }
        }
    }
    let quoted: Vec<String> = roles.iter().map(|r| format!("{r:?}")).collect();
    let noun = if roles.len() == 1 { "role" } else { "roles" };
    (true, format!("allowed by {noun} {}", quoted.join(", ")))
}

/// Every user may GET discovery, OpenAPI and the health paths; nothing else is served
/// outside resources.
fn non_resource_access(n: &NonResourceAttributes) -> (bool, String) {
    let path = n.path.as_deref().unwrap_or_default();
    let verb = n.verb.as_deref().unwrap_or_default();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let served = matches!(
        segs.as_slice(),
        ["healthz" | "readyz" | "livez" | "version" | "api" | "apis"]
            | ["api", "v1"]
            | ["apis", _]
            | ["apis", _, _]
            | ["openapi", "v2" | "v3", ..]
    );
    match (served, verb) {
        (false, _) => (false, format!("nothing is served at {path:?}")),
        (true, "get") => (true, format!("every user may get {path}")),
        (true, _) => (false, format!("only get is served at {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn user(roles: Vec<Role>, namespaces: Namespaces) -> User {
        User {
            name: "u".into(),
            roles,
            namespaces,
            device: None,
        }
    }

    fn attrs(verb: &str, group: &str, resource: &str, ns: &str) -> ResourceAttributes {
        ResourceAttributes {
            verb: Some(verb.into()),
            group: Some(group.into()),
            resource: Some(resource.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        }
    }

    #[test]
    fn answers_as_the_request_would_be_authorised() {
        let net = "networking.datumapis.com";
        let viewer = user(vec![Role::Viewer], Namespaces::Only(vec!["p1".into()]));
        assert_eq!(
            resource_access(&viewer, &attrs("list", net, "connectors", "p1")),
            (true, "allowed by role \"viewer\"".into())
        );
        let (allowed, reason) = resource_access(&viewer, &attrs("create", net, "connectors", "p1"));
        assert!(!allowed);
        assert_eq!(
            reason,
            "connectors.networking.datumapis.com is forbidden: User \"u\" cannot create resource \"connectors\" in API group \"networking.datumapis.com\" in the namespace \"p1\""
        );
        assert!(!resource_access(&viewer, &attrs("list", net, "connectors", "p2")).0);
        assert!(!resource_access(&viewer, &attrs("*", net, "connectors", "p1")).0);
        // A namespace is authorised by its own name.
        let mut ns = attrs("get", "", "namespaces", "");
        ns.name = Some("p1".into());
        assert!(resource_access(&viewer, &ns).0);
        ns.name = Some("p2".into());
        assert!(!resource_access(&viewer, &ns).0);

        let admin = user(vec![Role::Admin], Namespaces::All);
        assert_eq!(
            resource_access(&admin, &attrs("*", "*", "*", "")),
            (true, "allowed by role \"admin\"".into())
        );
        let mut status = attrs("patch", net, "connectors", "p1");
        status.subresource = Some("status".into());
        assert!(resource_access(&admin, &status).0);
        status.subresource = Some("scale".into());
        assert_eq!(
            resource_access(&admin, &status),
            (
                false,
                "no subresource \"scale\" of \"connectors\" is served here".into()
            )
        );
        assert_eq!(
            resource_access(&admin, &attrs("get", "", "pods", "p1")),
            (
                false,
                "no resource \"pods\" in API group \"\" is served here".into()
            )
        );
        assert_eq!(
            resource_access(&admin, &attrs("escalate", "", "namespaces", "")),
            (false, "no verb \"escalate\" is served here".into())
        );
        let crds = |verb: &str| {
            attrs(
                verb,
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "",
            )
        };
        assert!(resource_access(&viewer, &crds("list")).0);
        assert_eq!(
            resource_access(&admin, &crds("delete")),
            (
                false,
                "customresourcedefinitions.apiextensions.k8s.io only support get, list".into()
            )
        );
    }

    #[test]
    fn discovery_and_health_are_open_to_every_user() {
        let n = |verb: &str, path: &str| {
            non_resource_access(&NonResourceAttributes {
                verb: Some(verb.into()),
                path: Some(path.into()),
            })
        };
        assert!(n("get", "/healthz").0);
        assert!(n("get", "/apis/networking.datumapis.com/v1alpha1").0);
        assert!(n("get", "/openapi/v3/apis/x/v1").0);
        assert!(!n("post", "/api").0);
        assert_eq!(
            n("get", "/metrics"),
            (false, "nothing is served at \"/metrics\"".into())
        );
    }
}
