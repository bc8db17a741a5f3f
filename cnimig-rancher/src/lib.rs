//! # cnimig-rancher
//!
//! What Rancher adds (RKE1/RKE2 detection, the cluster agent on hostNetwork). Not built yet: see issue 6.
