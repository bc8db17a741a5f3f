//! Label constraints over Cilium identity keys: conjunctions normalised per key, disjunctive
//! normal forms of Calico selectors, and the mapping of Calico's label keys to Cilium's.

use std::collections::{BTreeMap, BTreeSet};

use super::cilium::{
    LabelSelector, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, Operator, Requirement,
    SERVICE_ACCOUNT_KEY,
};
use super::report::ItemKind;
use super::selector::Selector;

/// The most conjunctions a selector may expand into.
pub(crate) const MAX_TERMS: usize = 256;

/// The constraint on one label key (absent counts as a state).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum KeyCons {
    /// Present with one of these values.
    In(BTreeSet<String>),
    /// Absent, or present with none of these values.
    NotIn(BTreeSet<String>),
    /// Present.
    Exists,
    /// Absent.
    NotExists,
    /// Present with none of these values.
    ExistsNotIn(BTreeSet<String>),
}

impl KeyCons {
    /// Whether a label value (or absence) satisfies the constraint.
    pub(crate) fn matches(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (KeyCons::In(s), Some(v)) => s.contains(v),
            (KeyCons::In(_), None) => false,
            (KeyCons::NotIn(s), Some(v)) => !s.contains(v),
            (KeyCons::NotIn(_), None) => true,
            (KeyCons::Exists, v) => v.is_some(),
            (KeyCons::NotExists, v) => v.is_none(),
            (KeyCons::ExistsNotIn(s), Some(v)) => !s.contains(v),
            (KeyCons::ExistsNotIn(_), None) => false,
        }
    }

    /// The conjunction of two constraints, or `None` when nothing satisfies both.
    fn and(&self, other: &KeyCons) -> Option<KeyCons> {
        use KeyCons::{Exists, ExistsNotIn, In, NotExists, NotIn};
        let r = match (self, other) {
            (In(a), In(b)) => In(a.intersection(b).cloned().collect()),
            (In(a), NotIn(b) | ExistsNotIn(b)) | (NotIn(b) | ExistsNotIn(b), In(a)) => {
                In(a.difference(b).cloned().collect())
            }
            (In(a), Exists) | (Exists, In(a)) => In(a.clone()),
            (In(_), NotExists) | (NotExists, In(_)) => return None,
            (NotIn(a), NotIn(b)) => NotIn(a.union(b).cloned().collect()),
            (NotIn(a), Exists) | (Exists, NotIn(a)) => ExistsNotIn(a.clone()),
            (NotIn(_), NotExists) | (NotExists, NotIn(_)) | (NotExists, NotExists) => NotExists,
            (NotIn(a) | ExistsNotIn(a), ExistsNotIn(b)) | (ExistsNotIn(b), NotIn(a)) => {
                ExistsNotIn(a.union(b).cloned().collect())
            }
            (Exists, Exists) => Exists,
            (Exists, ExistsNotIn(a)) | (ExistsNotIn(a), Exists) => ExistsNotIn(a.clone()),
            (Exists | ExistsNotIn(_), NotExists) | (NotExists, Exists | ExistsNotIn(_)) => {
                return None;
            }
        };
        match &r {
            In(s) if s.is_empty() => None,
            _ => Some(r),
        }
    }
}

/// A conjunction of key constraints, plus the parts of the source selector that could not be
/// expressed (left out of `keys`; the caller decides whether that widens or drops the term).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Conj {
    pub(crate) keys: BTreeMap<String, KeyCons>,
    pub(crate) lossy: BTreeSet<(ItemKind, String)>,
}

impl Conj {
    /// Adds a constraint; false when the conjunction became unsatisfiable.
    pub(crate) fn add(&mut self, key: &str, c: KeyCons) -> bool {
        let merged = match self.keys.get(key) {
            Some(old) => old.and(&c),
            None => match &c {
                KeyCons::In(s) if s.is_empty() => None,
                _ => Some(c),
            },
        };
        match merged {
            // `NotIn {}` holds for every value: no constraint.
            Some(KeyCons::NotIn(s)) if s.is_empty() => {
                self.keys.remove(key);
                true
            }
            Some(KeyCons::ExistsNotIn(s)) if s.is_empty() => {
                self.keys.insert(key.to_string(), KeyCons::Exists);
                true
            }
            Some(m) => {
                self.keys.insert(key.to_string(), m);
                true
            }
            None => false,
        }
    }

    /// The conjunction of two, or `None` when unsatisfiable.
    pub(crate) fn and(&self, other: &Conj) -> Option<Conj> {
        let mut out = self.clone();
        for (k, c) in &other.keys {
            if !out.add(k, c.clone()) {
                return None;
            }
        }
        out.lossy.extend(other.lossy.iter().cloned());
        Some(out)
    }

    /// As a Kubernetes label selector.
    pub(crate) fn to_selector(&self) -> LabelSelector {
        let mut sel = LabelSelector::default();
        let sorted = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        for (k, c) in &self.keys {
            let req = |operator, values| Requirement {
                key: k.clone(),
                operator,
                values,
            };
            match c {
                KeyCons::In(s) if s.len() == 1 => {
                    if let Some(v) = s.iter().next() {
                        sel.match_labels.insert(k.clone(), v.clone());
                    }
                }
                KeyCons::In(s) => sel.match_expressions.push(req(Operator::In, sorted(s))),
                KeyCons::NotIn(s) => sel.match_expressions.push(req(Operator::NotIn, sorted(s))),
                KeyCons::Exists => sel.match_expressions.push(req(Operator::Exists, vec![])),
                KeyCons::NotExists => sel
                    .match_expressions
                    .push(req(Operator::DoesNotExist, vec![])),
                KeyCons::ExistsNotIn(s) => {
                    sel.match_expressions.push(req(Operator::Exists, vec![]));
                    sel.match_expressions.push(req(Operator::NotIn, sorted(s)));
                }
            }
        }
        sel
    }
}

/// A disjunction of conjunctions; empty matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Dnf(pub(crate) Vec<Conj>);

/// A selector that expands into more than [`MAX_TERMS`] conjunctions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooComplex;

impl Dnf {
    pub(crate) fn top() -> Dnf {
        Dnf(vec![Conj::default()])
    }
    pub(crate) fn bottom() -> Dnf {
        Dnf(Vec::new())
    }
    pub(crate) fn single(key: &str, c: KeyCons) -> Dnf {
        let mut conj = Conj::default();
        if conj.add(key, c) {
            Dnf(vec![conj])
        } else {
            Dnf::bottom()
        }
    }
    pub(crate) fn is_bottom(&self) -> bool {
        self.0.is_empty()
    }
    /// True when some term has no constraint at all (matches everything).
    pub(crate) fn is_top(&self) -> bool {
        self.0
            .iter()
            .any(|c| c.keys.is_empty() && c.lossy.is_empty())
    }

    /// A DNF of these terms (deduplicated).
    pub(crate) fn from_terms(terms: Vec<Conj>) -> Dnf {
        Dnf(terms).normalise()
    }

    fn normalise(mut self) -> Dnf {
        if self.is_top() {
            return Dnf::top();
        }
        self.0.sort();
        self.0.dedup();
        self
    }

    pub(crate) fn and(&self, other: &Dnf) -> Result<Dnf, TooComplex> {
        let mut out = Vec::new();
        for a in &self.0 {
            for b in &other.0 {
                if let Some(c) = a.and(b) {
                    out.push(c);
                    if out.len() > MAX_TERMS * 4 {
                        return Err(TooComplex);
                    }
                }
            }
        }
        let d = Dnf(out).normalise();
        if d.0.len() > MAX_TERMS {
            return Err(TooComplex);
        }
        Ok(d)
    }

    pub(crate) fn or(mut self, other: Dnf) -> Result<Dnf, TooComplex> {
        self.0.extend(other.0);
        let d = self.normalise();
        if d.0.len() > MAX_TERMS {
            return Err(TooComplex);
        }
        Ok(d)
    }

    /// Whether some term of `self` and some term of `other` can hold together.
    pub(crate) fn overlaps(&self, other: &Dnf) -> bool {
        self.0
            .iter()
            .any(|a| other.0.iter().any(|b| a.and(b).is_some()))
    }
}

/// Where a selector's keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    /// Endpoint (pod) labels, with Calico's automatic `projectcalico.org/*`, `pcns.*` and
    /// `pcsa.*` labels.
    Endpoint,
    /// Namespace labels (`namespaceSelector`), with `projectcalico.org/name`.
    Namespace,
    /// Service account labels (`serviceAccounts.selector`), with `projectcalico.org/name`.
    ServiceAccount,
}

enum Mapped {
    Key(String),
    Const(&'static str),
    Lossy(ItemKind, &'static str),
}

fn map_key(ctx: Ctx, key: &str) -> Mapped {
    match ctx {
        Ctx::Endpoint => match key {
            "projectcalico.org/namespace" => Mapped::Key(NAMESPACE_KEY.into()),
            "projectcalico.org/serviceaccount" => Mapped::Key(SERVICE_ACCOUNT_KEY.into()),
            "projectcalico.org/orchestrator" => Mapped::Const("k8s"),
            _ => {
                if let Some(ns_key) = key.strip_prefix("pcns.") {
                    map_key(Ctx::Namespace, ns_key)
                } else if key.starts_with("pcsa.") {
                    Mapped::Lossy(
                        ItemKind::ServiceAccountLabels,
                        "Cilium identities carry the service account name, not its labels",
                    )
                } else if cilium_filters_label(key) {
                    Mapped::Lossy(
                        ItemKind::LabelFiltered,
                        "Cilium's default identity label filter leaves this label out",
                    )
                } else {
                    Mapped::Key(key.to_string())
                }
            }
        },
        Ctx::Namespace => match key {
            "projectcalico.org/name" => Mapped::Key(NAMESPACE_KEY.into()),
            _ => Mapped::Key(format!("{NAMESPACE_LABELS_PREFIX}{key}")),
        },
        Ctx::ServiceAccount => match key {
            "projectcalico.org/name" => Mapped::Key(SERVICE_ACCOUNT_KEY.into()),
            _ => Mapped::Lossy(
                ItemKind::ServiceAccountLabels,
                "Cilium identities carry the service account name, not its labels",
            ),
        },
    }
}

/// Whether Cilium's default identity-relevant label filter drops a pod label key
/// (`pkg/labelsfilter`: `!io.kubernetes`, `!kubernetes.io`, `!.*beta.kubernetes.io`,
/// `!k8s.io`, `!pod-template-hash`, … with `app.kubernetes.io` and the namespace labels kept).
#[must_use]
pub fn cilium_filters_label(key: &str) -> bool {
    const IGNORE_PREFIXES: &[&str] = &[
        "io.kubernetes",
        "kubernetes.io",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
        "k8s.io",
        "pod-template-generation",
        "pod-template-hash",
        "controller-revision-hash",
        "annotation",
        "etcd_node",
    ];
    const INCLUDE_PREFIXES: &[&str] = &[
        "io.kubernetes.pod.namespace",
        "io.cilium.k8s.namespace.labels",
        "app.kubernetes.io",
        "io.cilium.k8s.policy.cluster",
    ];
    let mut ignored = IGNORE_PREFIXES
        .iter()
        .filter(|p| key.starts_with(*p))
        .map(|p| {
            if *p == "annotation" {
                key.len()
            } else {
                p.len()
            }
        })
        .min()
        .unwrap_or(0);
    if let Some(i) = key.rfind("beta.kubernetes.io") {
        let len = i + "beta.kubernetes.io".len();
        if ignored == 0 || len < ignored {
            ignored = len;
        }
    }
    let included = INCLUDE_PREFIXES
        .iter()
        .filter(|p| key.starts_with(*p))
        .map(|p| p.len())
        .max()
        .unwrap_or(0);
    ignored != 0 && included <= ignored
}

fn leaf(ctx: Ctx, key: &str, c: KeyCons, text: impl FnOnce() -> String) -> Dnf {
    match map_key(ctx, key) {
        Mapped::Key(k) => Dnf::single(&k, c),
        Mapped::Const(v) => {
            if c.matches(Some(v)) {
                Dnf::top()
            } else {
                Dnf::bottom()
            }
        }
        Mapped::Lossy(kind, why) => {
            let mut conj = Conj::default();
            conj.lossy.insert((kind, format!("`{}`: {why}", text())));
            Dnf(vec![conj])
        }
    }
}

fn set(vs: &[String]) -> BTreeSet<String> {
    vs.iter().cloned().collect()
}

/// The DNF of `sel` (or of `!sel` when `neg`) over Cilium keys.
pub(crate) fn dnf(sel: &Selector, neg: bool, ctx: Ctx) -> Result<Dnf, TooComplex> {
    let bang = |s: &Selector| {
        if neg {
            format!("!({s})")
        } else {
            s.to_string()
        }
    };
    Ok(match sel {
        Selector::All => {
            if neg {
                Dnf::bottom()
            } else {
                Dnf::top()
            }
        }
        // `global()` matches no pod (only host endpoints and global network sets).
        Selector::Global => {
            if neg {
                Dnf::top()
            } else {
                Dnf::bottom()
            }
        }
        Selector::Eq(k, v) | Selector::Ne(k, v) => {
            let positive = matches!(sel, Selector::Eq(..)) != neg;
            let vs = BTreeSet::from([v.clone()]);
            let c = if positive {
                KeyCons::In(vs)
            } else {
                KeyCons::NotIn(vs)
            };
            leaf(ctx, k, c, || bang(sel))
        }
        Selector::In(k, vs) | Selector::NotIn(k, vs) => {
            let positive = matches!(sel, Selector::In(..)) != neg;
            let c = if positive {
                KeyCons::In(set(vs))
            } else {
                KeyCons::NotIn(set(vs))
            };
            leaf(ctx, k, c, || bang(sel))
        }
        Selector::Has(k) => {
            let c = if neg {
                KeyCons::NotExists
            } else {
                KeyCons::Exists
            };
            leaf(ctx, k, c, || bang(sel))
        }
        Selector::StartsWith(..) | Selector::EndsWith(..) | Selector::Contains(..) => {
            let mut conj = Conj::default();
            conj.lossy.insert((
                ItemKind::StringMatch,
                format!(
                    "`{}`: Kubernetes label selectors cannot match parts of values",
                    bang(sel)
                ),
            ));
            Dnf(vec![conj])
        }
        Selector::Not(e) => dnf(e, !neg, ctx)?,
        Selector::And(es) | Selector::Or(es) => {
            // And under negation is an Or of negations, and vice versa.
            let conjunctive = matches!(sel, Selector::And(_)) != neg;
            let mut acc = if conjunctive {
                Dnf::top()
            } else {
                Dnf::bottom()
            };
            for e in es {
                let d = dnf(e, neg, ctx)?;
                acc = if conjunctive {
                    acc.and(&d)?
                } else {
                    acc.or(d)?
                };
            }
            acc
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dnf {
        dnf(&Selector::parse(s).unwrap(), false, Ctx::Endpoint).unwrap()
    }

    #[test]
    fn or_splits_and_negation_pushes_down() {
        let x = d("(a == '1' || b == '2') && !(c in {'x', 'y'} || has(e))");
        assert_eq!(x.0.len(), 2);
        for c in &x.0 {
            assert_eq!(
                c.keys.get("c"),
                Some(&KeyCons::NotIn(BTreeSet::from(["x".into(), "y".into()])))
            );
            assert_eq!(c.keys.get("e"), Some(&KeyCons::NotExists));
        }
        assert!(d("a == '1' && a == '2'").is_bottom());
        assert!(d("a == '1' && !has(a)").is_bottom());
        assert!(d("all() || a == '1'").is_top());
        assert!(d("!all()").is_bottom());
    }

    #[test]
    fn calico_keys_map_to_cilium_identity_labels() {
        let x = d(
            "projectcalico.org/namespace == 'ns' && pcns.team == 'a' && projectcalico.org/orchestrator == 'k8s'",
        );
        let c = &x.0[0];
        assert!(c.keys.contains_key(NAMESPACE_KEY));
        assert!(
            c.keys
                .contains_key("k8s:io.cilium.k8s.namespace.labels.team")
        );
        assert_eq!(c.keys.len(), 2);
        let lossy = d("pod-template-hash == 'x' || app starts with 'w'");
        assert!(lossy.0.iter().all(|c| !c.lossy.is_empty()));
    }

    #[test]
    fn label_filter_follows_cilium_defaults() {
        assert!(cilium_filters_label("pod-template-hash"));
        assert!(cilium_filters_label("statefulset.kubernetes.io/pod-name"));
        assert!(cilium_filters_label(
            "failure-domain.beta.kubernetes.io/zone"
        ));
        assert!(cilium_filters_label("kubernetes.io/hostname"));
        assert!(!cilium_filters_label("app.kubernetes.io/name"));
        assert!(!cilium_filters_label("io.kubernetes.pod.namespace"));
        assert!(!cilium_filters_label("app"));
        assert!(!cilium_filters_label("topology.kubernetes.io/zone"));
    }

    #[test]
    fn selectors_render_as_match_labels_and_expressions() {
        let x = d("a == '1' && b in {'x', 'y'} && !has(c) && d != 'z' && has(e) && e != 'q'");
        let sel = x.0[0].to_selector();
        assert_eq!(sel.match_labels.get("a").map(String::as_str), Some("1"));
        assert_eq!(sel.match_expressions.len(), 5);
    }
}
