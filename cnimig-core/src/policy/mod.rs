//! Calico network policy to Cilium network policy conversion.
//!
//! Start with [`calico::parse_documents`] (Calico YAML, multi-document), then
//! [`convert::convert_documents`], which returns the Cilium objects and a
//! [`report::ConversionReport`] saying, per Calico policy, whether the output is exact or
//! partial and why. [`convert::render_yaml`] prints the objects for review.
//!
//! - [`selector`]: Calico's selector language (parser, printer, evaluation).
//! - [`calico`]: typed `NetworkPolicy` / `GlobalNetworkPolicy` input.
//! - [`cilium`]: the Cilium policy types written and read.
//! - [`convert`](mod@convert): the conversion. Nothing that cannot be expressed is dropped silently: it is
//!   reported, and approximated towards less access (allow rules narrowed, deny rules widened).
//! - [`eval`]: reference evaluators for both CNIs over a model of pods and connections; the
//!   property tests check that they agree whenever the report says the conversion is exact.
//! - [`audit`]: Kubernetes `NetworkPolicy` constructs that behave differently under Cilium.
//!
//! Everything here is pure: no IO, no clock.
//!
//! ```
//! use cnimig_core::policy::{calico, convert};
//!
//! let yaml = r#"
//! apiVersion: projectcalico.org/v3
//! kind: NetworkPolicy
//! metadata: {name: allow-web, namespace: shop}
//! spec:
//!   selector: app == 'db'
//!   ingress:
//!   - action: Allow
//!     protocol: TCP
//!     source: {selector: app == 'web' || app == 'api'}
//!     destination: {ports: [5432]}
//! "#;
//! let parsed = calico::parse_documents(yaml).unwrap();
//! let opts = convert::ConvertOptions {
//!     pod_cidrs: vec!["10.42.0.0/16".parse().unwrap()],
//!     ..Default::default()
//! };
//! let conv = convert::convert_documents(&parsed, &opts);
//! assert!(conv.report.all_exact());
//! assert_eq!(conv.objects[0].object["kind"], "CiliumNetworkPolicy");
//! // The `||` became two peers.
//! assert_eq!(conv.objects[0].object["spec"]["ingress"][0]["fromEndpoints"].as_array().unwrap().len(), 2);
//! ```

pub mod audit;
pub mod calico;
pub mod cilium;
pub mod convert;
pub mod eval;
mod norm;
pub mod report;
pub mod selector;

pub use audit::{AuditFinding, ClusterCidrs, FindingKind, audit_k8s_network_policies};
pub use calico::{CalicoPolicy, ParsedDocuments, PolicyRef, parse_documents};
pub use convert::{
    Conversion, ConvertOptions, InvalidCidr, convert, convert_documents, parse_cidrs, render_yaml,
};
pub use eval::{CalicoEvaluator, CiliumEvaluator, Connection, Endpoint, Pod, Verdict, World};
pub use norm::cilium_filters_label;
pub use report::{ConversionReport, ItemKind, ReportItem, Status};
pub use selector::{Selector, SelectorError};
