//! The upstream registries of the mirror (`SHOAL_REGISTRY_UPSTREAM`) and the choice of one per
//! request: containerd names the registry it means in the `ns` query parameter; a name that
//! matches no configured entry is refused, so the mirror never reaches an arbitrary host.

use crate::peer::origin::OriginUrl;

/// One upstream registry: its base URL and the names `ns` may give it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub base: OriginUrl,
    /// `alias=` of the entry, if any (`docker.io`).
    alias: Option<String>,
    /// `host[:port]` as the entry writes it.
    host: String,
}

impl Upstream {
    /// The registry name this entry answers to as an `ns`: its alias, else `host[:port]`.
    pub fn name(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.host)
    }

    /// `alias=` of the entry, if any.
    pub fn alias(&self) -> Option<&str> {
        self.alias.as_deref()
    }
}

/// The configured upstreams, in order; the first serves requests without `ns`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstreams(Vec<Upstream>);

impl Upstreams {
    /// Parses `[alias=]http[s]://host[:port]` entries separated by commas.
    pub fn parse(list: &str) -> Result<Upstreams, String> {
        let mut entries = Vec::new();
        for entry in list.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(format!(
                    "{list:?} has an empty entry: give [alias=]http[s]://host[:port] entries separated by commas"
                ));
            }
            let (alias, url) = match entry.split_once('=') {
                Some((alias, url)) if !alias.trim().is_empty() => {
                    (Some(alias.trim().to_string()), url.trim())
                }
                Some(_) => return Err(format!("{entry:?} has an empty alias before '='")),
                None => (None, entry),
            };
            let base = OriginUrl::parse(url)?;
            let host = url
                .split_once("://")
                .map_or(url, |(_, rest)| rest)
                .trim_end_matches('/');
            if host.contains('/') {
                return Err(format!(
                    "{url:?} has a path: a registry upstream is scheme://host[:port] only"
                ));
            }
            entries.push(Upstream {
                base,
                alias,
                host: host.to_string(),
            });
        }
        Ok(Upstreams(entries))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.0.iter()
    }

    /// The upstream `ns` names (its alias, or `host[:port]` as configured), or the first one
    /// without `ns`; `None` when `ns` names none of them.
    pub fn pick(&self, ns: Option<&str>) -> Option<&Upstream> {
        match ns {
            None => self.0.first(),
            Some(ns) => self
                .0
                .iter()
                .find(|u| u.alias.as_deref() == Some(ns) || u.host == ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_picks_an_entry_by_alias_or_host_and_nothing_else() {
        let list = Upstreams::parse("docker.io=http://127.0.0.1:5000, http://registry.local:5001")
            .unwrap();
        let host = |u: Option<&Upstream>| u.map(|u| u.base.host_port());
        assert_eq!(host(list.pick(None)).as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(
            host(list.pick(Some("docker.io"))).as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(
            host(list.pick(Some("registry.local:5001"))).as_deref(),
            Some("registry.local:5001")
        );
        assert!(list.pick(Some("evil.example")).is_none());
        assert_eq!(
            host(list.pick(Some("127.0.0.1:5000"))).as_deref(),
            Some("127.0.0.1:5000")
        );
        assert!(Upstreams::default().pick(None).is_none());
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        assert!(Upstreams::parse("").unwrap_err().contains("empty entry"));
        assert!(Upstreams::parse("=http://a").unwrap_err().contains("alias"));
        assert!(Upstreams::parse("http://a/v2")
            .unwrap_err()
            .contains("path"));
        assert!(Upstreams::parse("a.example").is_err());
    }
}
