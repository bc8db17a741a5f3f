//! # cnimig-kube
//!
//! The ports of `cnimig-core` on a real Kubernetes API (kube-rs). Not built yet: see issue 3.
