//! The README documents every setting and every metric the binaries have.

use shoal::config::{PeerConfig, TrackerConfig};
use shoal::metrics::{PeerMetrics, TrackerMetrics};

const README: &str = include_str!("../README.md");

fn setting_variables<T: serde::Serialize>(settings: &T) -> Vec<String> {
    let value = serde_json::to_value(settings).unwrap();
    value
        .as_object()
        .unwrap()
        .keys()
        .map(|k| format!("SHOAL_{}", k.to_uppercase()))
        .collect()
}

#[test]
fn readme_documents_every_setting_with_its_variable() {
    let mut vars = setting_variables(&TrackerConfig::default());
    vars.extend(setting_variables(&PeerConfig::default()));
    vars.push("SHOAL_CONFIG".into());
    for var in vars {
        assert!(
            README.contains(&format!("| `{var}` |")),
            "README's configuration tables lack {var}"
        );
    }
}

#[test]
fn readme_documents_every_metric() {
    let families = TrackerMetrics::default()
        .registry
        .gather()
        .into_iter()
        .chain(PeerMetrics::default().registry.gather());
    for family in families {
        let name = family.get_name();
        assert!(
            README.contains(&format!("| `{name}")),
            "README's metrics table lacks {name}"
        );
    }
}
