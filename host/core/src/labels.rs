//! Label selectors, as Kubernetes writes them (`matchLabels`, `matchExpressions` with `In`,
//! `NotIn`, `Exists`, `DoesNotExist`): a pool's `nodeSelector` and `namespaceSelector`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A label selector. Empty selects everything; every term must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    /// The label's key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// The values (`In`, `NotIn`: at least one; `Exists`, `DoesNotExist`: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Why the selector cannot be evaluated, if it cannot.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.match_expressions {
            match r.operator.as_str() {
                "In" | "NotIn" if r.values.is_empty() => {
                    return Err(format!(
                        "matchExpressions: {} {} needs at least one value",
                        r.key, r.operator
                    ));
                }
                "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                    return Err(format!(
                        "matchExpressions: {} {} takes no values",
                        r.key, r.operator
                    ));
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => {
                    return Err(format!(
                        "matchExpressions: operator {other:?} of {} is not In, NotIn, Exists or DoesNotExist",
                        r.key
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `labels` satisfy every term. A selector that does not validate selects
    /// nothing.
    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        let get = |k: &str| labels.iter().find(|(l, _)| l == k).map(|(_, v)| v.as_str());
        self.validate().is_ok()
            && self
                .match_labels
                .iter()
                .all(|(k, v)| get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let has = get(&r.key);
                match r.operator.as_str() {
                    "In" => has.is_some_and(|v| r.values.iter().any(|w| w == v)),
                    "NotIn" => has.is_none_or(|v| r.values.iter().all(|w| w != v)),
                    "Exists" => has.is_some(),
                    "DoesNotExist" => has.is_none(),
                    _ => false,
                }
            })
    }
}

impl std::fmt::Display for LabelSelector {
    /// As `kubectl` shows selectors: `a=b,c in (d,e),!f`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            terms.push(match r.operator.as_str() {
                "In" => format!("{} in ({})", r.key, r.values.join(",")),
                "NotIn" => format!("{} notin ({})", r.key, r.values.join(",")),
                "Exists" => r.key.clone(),
                "DoesNotExist" => format!("!{}", r.key),
                other => format!("{} {other} ({})", r.key, r.values.join(",")),
            });
        }
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sel(json: &str) -> LabelSelector {
        serde_json::from_str(json).expect("selector")
    }

    #[test]
    fn every_term_must_hold() {
        let s = sel(r#"{"matchLabels": {"zone": "a"}, "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["db", "web"]},
                {"key": "gpu", "operator": "DoesNotExist"},
                {"key": "rack", "operator": "Exists"},
                {"key": "env", "operator": "NotIn", "values": ["prod"]}]}"#);
        let ok = labels(&[("zone", "a"), ("tier", "db"), ("rack", "r1")]);
        assert!(s.matches(&ok));
        for (bad, why) in [
            (
                labels(&[("zone", "b"), ("tier", "db"), ("rack", "r1")]),
                "zone",
            ),
            (
                labels(&[("zone", "a"), ("tier", "x"), ("rack", "r1")]),
                "In",
            ),
            (labels(&[("zone", "a"), ("rack", "r1")]), "In, absent"),
            (
                labels(&[("zone", "a"), ("tier", "db"), ("rack", "r1"), ("gpu", "")]),
                "DoesNotExist",
            ),
            (labels(&[("zone", "a"), ("tier", "db")]), "Exists"),
            (
                labels(&[
                    ("zone", "a"),
                    ("tier", "db"),
                    ("rack", "r1"),
                    ("env", "prod"),
                ]),
                "NotIn",
            ),
        ] {
            assert!(!s.matches(&bad), "{why}: {bad:?}");
        }
        assert!(LabelSelector::default().matches(&[]), "empty selects all");
    }

    #[test]
    fn malformed_selectors_are_refused_and_select_nothing() {
        for (json, want) in [
            (
                r#"{"matchExpressions": [{"key": "a", "operator": "In"}]}"#,
                "needs at least one value",
            ),
            (
                r#"{"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}"#,
                "takes no values",
            ),
            (
                r#"{"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}"#,
                "is not In",
            ),
        ] {
            let s = sel(json);
            let e = s.validate().expect_err(json);
            assert!(e.contains(want), "{e}");
            assert!(!s.matches(&labels(&[("a", "1")])), "{json}");
        }
    }

    #[test]
    fn shown_as_kubectl_does() {
        let s = sel(r#"{"matchLabels": {"zone": "a"}, "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["db", "web"]},
                {"key": "gpu", "operator": "DoesNotExist"}]}"#);
        assert_eq!(s.to_string(), "zone=a,tier in (db,web),!gpu");
    }
}
