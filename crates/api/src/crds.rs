//! CustomResourceDefinitions generated from the types, for `portway crds` and real clusters.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{
    AccessPolicy, BackendTrafficPolicy, Connector, ConnectorAdvertisement, ConnectorClass,
    HttpProxy, TcpProxy,
};

/// Every CRD Portway declares, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        ConnectorClass::crd(),
        Connector::crd(),
        ConnectorAdvertisement::crd(),
        HttpProxy::crd(),
        TcpProxy::crd(),
        BackendTrafficPolicy::crd(),
        AccessPolicy::crd(),
    ]
}

/// All CRDs as one multi-document YAML stream.
///
/// # Errors
/// Only if serialisation fails, which the types rule out in practice.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_crds_match_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/crds/portway.yaml"
        );
        let committed = std::fs::read_to_string(path).expect("deploy/crds/portway.yaml");
        let generated = super::crds_yaml().unwrap();
        // Equal but empty would prove nothing.
        assert_eq!(
            generated.matches("kind: CustomResourceDefinition").count(),
            super::all_crds().len()
        );
        assert!(super::all_crds().len() >= 4, "every Portway kind has a CRD");
        assert!(
            committed == generated,
            "deploy/crds/portway.yaml is out of date; regenerate it with `cargo run -p portway -- crds > deploy/crds/portway.yaml`"
        );
    }
}
