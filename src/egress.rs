//! Requests we make on a tenant's behalf (provider and integration URLs, SMTP hosts) go to
//! public addresses only, so a tenant cannot use Rapport to reach the metadata service, the
//! database or anything else on the operator's network.
//!
//! The rule is checked twice: when a URL or host is saved (a literal private address or
//! `localhost` is a 422), and when we connect (every name is resolved and each address is
//! checked, so a name that resolves to a public address on save and to `10.0.0.1` later, DNS
//! rebinding, is refused too). Operators allow named hosts (`egress_allow_hosts`) for tests
//! and on-premise relays; an allowed host may also be reached over plain `http`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Which hosts tenants' URLs may name besides public ones.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Arc<Vec<String>>,
}

impl EgressPolicy {
    /// Public addresses only, plus `allow` (host names or IP addresses, case-insensitive).
    pub fn new(allow: &[String]) -> EgressPolicy {
        EgressPolicy {
            allow: Arc::new(
                allow
                    .iter()
                    .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect(),
            ),
        }
    }

    /// Whether the operator allowed `host` by name.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_matches(['[', ']']);
        self.allow.iter().any(|a| a.eq_ignore_ascii_case(host))
    }

    /// Checks a URL a tenant gives for us to call: `https` to a public host, or an allowed
    /// host. The message is fit for the tenant.
    pub fn check_url(&self, raw: &str) -> Result<url::Url, String> {
        let url = url::Url::parse(raw).map_err(|_| "must be an http(s) URL".to_owned())?;
        let host = url
            .host_str()
            .ok_or_else(|| "must name a host".to_owned())?;
        if self.allows_host(host) {
            return match url.scheme() {
                "http" | "https" => Ok(url),
                _ => Err("must be an http(s) URL".to_owned()),
            };
        }
        if url.scheme() != "https" {
            return Err("must be an https URL".to_owned());
        }
        self.check_host(host)?;
        Ok(url)
    }

    /// Checks a host name or address a tenant gives for us to connect to (an SMTP relay).
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let bare = host.trim_matches(['[', ']']);
        if self.allows_host(bare) {
            return Ok(());
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return if is_public(ip) {
                Ok(())
            } else {
                Err(refusal())
            };
        }
        let lower = bare.trim_end_matches('.').to_ascii_lowercase();
        let local = lower == "localhost"
            || !lower.contains('.')
            || [
                ".localhost",
                ".local",
                ".internal",
                ".localdomain",
                ".home.arpa",
            ]
            .iter()
            .any(|suffix| lower.ends_with(suffix));
        if local { Err(refusal()) } else { Ok(()) }
    }

    /// The addresses of `host` we may connect to: all of them for an allowed host, else the
    /// public ones; an error when none is left.
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let bare = host.trim_matches(['[', ']']);
        let found: Vec<SocketAddr> = tokio::net::lookup_host((bare, port)).await?.collect();
        if self.allows_host(bare) {
            return Ok(found);
        }
        let public: Vec<SocketAddr> = found.into_iter().filter(|a| is_public(a.ip())).collect();
        if public.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                refusal(),
            ));
        }
        Ok(public)
    }
}

fn refusal() -> String {
    "must be a public address: loopback, private, link-local and similar addresses are refused \
     (an operator can allow a host with egress_allow_hosts)"
        .to_owned()
}

/// Whether `ip` is an address on the public internet: not loopback, private, link-local
/// (which holds the cloud metadata services), shared, multicast, documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            is_public_v6(v6)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments, 192.0.0.0/24, and benchmarking, 198.18.0.0/15.
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        // Reserved, 240.0.0.0/4.
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local, fc00::/7.
        || (first & 0xfe00) == 0xfc00
        // Link-local, fe80::/10.
        || (first & 0xffc0) == 0xfe80
        // Documentation, 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed IPv4 addresses we cannot vet here.
        || first == 0x0064
        || first == 0x2002)
}

/// A DNS resolver for reqwest that applies the policy to every name it resolves.
pub struct Resolver(pub EgressPolicy);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let addrs = policy.resolve(name.as_str(), 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client for requests on tenants' behalf: every name it resolves goes through the
/// policy. (Literal addresses are not resolved: check URLs with
/// [`EgressPolicy::check_url`] before each request.)
pub fn client_builder(policy: &EgressPolicy) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(Resolver(policy.clone())))
        // A redirect could lead anywhere: providers' APIs do not redirect.
        .redirect(reqwest::redirect::Policy::none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_and_metadata_addresses_are_refused() {
        let p = EgressPolicy::default();
        for url in [
            "http://169.254.169.254/latest",
            "https://169.254.169.254/latest",
            "https://10.0.0.1",
            "https://127.0.0.1:5432",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://localhost/x",
            "https://db.internal/x",
            "https://100.64.0.1",
            "https://0.0.0.0",
            "https://metadata/x",
            "http://api.twilio.com",
            "ftp://api.twilio.com",
        ] {
            assert!(p.check_url(url).is_err(), "{url}");
        }
        assert!(p.check_url("https://api.twilio.com").is_ok());
        assert!(p.check_url("https://8.8.8.8/x").is_ok());
    }

    #[test]
    fn an_allowed_host_may_be_private_and_plain_http() {
        let p = EgressPolicy::new(&["127.0.0.1".into(), "relay.corp".into()]);
        assert!(p.check_url("http://127.0.0.1:8080/x").is_ok());
        assert!(p.check_host("relay.corp").is_ok());
        assert!(p.check_url("http://127.0.0.2/x").is_err());
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let p = EgressPolicy::default();
        let e = p.resolve("localhost", 80).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        let allowed = EgressPolicy::new(&["localhost".into()]);
        assert!(!allowed.resolve("localhost", 80).await.unwrap().is_empty());
    }
}
