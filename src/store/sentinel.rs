//! Finding the Redis primary through Redis Sentinel.
//!
//! Deployments that run Redis for high availability usually run it under
//! Sentinel: a few sentinel processes watch a primary and its replicas,
//! promote a replica when the primary fails, and tell clients where the
//! primary is now. Listing the nodes in `redis_url` (the other way
//! Conveyor follows a failover) needs every node known in advance; with
//! Sentinel only the sentinels are, and nodes may be replaced.
//!
//! # URL
//!
//! ```text
//! redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?sentinel_username=u&sentinel_password=p]
//! ```
//!
//! - the hosts are the sentinels (port 26379 by default), asked together;
//! - `service` is the name the sentinels monitor the primary under;
//! - the credentials before `@` and `db` are for the Redis nodes, as in a
//!   `redis://` URL; sentinels that require a password of their own take
//!   it from `sentinel_password` (and `sentinel_username`);
//! - `rediss+sentinel://` speaks TLS to the sentinels and to the nodes
//!   (trusting `tls_ca_file` when set); a node's certificate must then be
//!   valid for the address the sentinels announce, an IP address unless
//!   they run with `announce-hostnames yes`.
//!
//! # Discovery
//!
//! Ask the sentinels `SENTINEL get-master-addr-by-name <service>` and, for
//! the epoch of that view, `SENTINEL MASTER <service>` (all sentinels at
//! once), take the address of the newest view (the highest
//! `config-epoch`) among the first majority of answers, and check with `ROLE` that the node really is the
//! primary (a sentinel may not yet know of a failover). Not the first
//! answer, as Redis's guidelines for Sentinel clients have it: a sentinel
//! cut off together with the old primary cannot join the failover and goes
//! on naming it, and the old primary goes on taking writes that the
//! failover throws away once the cut heals. The store does this
//! whenever it needs a new connection: at start, and after its connection
//! broke or the node answered `READONLY` (a demoted primary), so it follows
//! a failover without a restart. It also asks every 2 s, and drops its
//! connection when the sentinels name another node: a primary they
//! replaced without its knowing refuses nothing. Password and URL are
//! never logged unredacted.

use std::fmt;

/// The default port of a sentinel.
pub const SENTINEL_PORT: u16 = 26379;

/// A parsed `redis+sentinel://` or `rediss+sentinel://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// Whether to speak TLS (to sentinels and nodes).
    pub tls: bool,
    /// The sentinels, as `host:port` (IPv6 hosts in brackets).
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub service: String,
    /// The nodes' credentials as written in the URL (still
    /// percent-encoded), without the `@`.
    node_userinfo: Option<String>,
    /// The nodes' database number.
    pub db: u32,
    /// The sentinels' credentials, as `user:password` or `:password`
    /// (still percent-encoded).
    sentinel_userinfo: Option<String>,
}

impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("service", &self.service)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl SentinelUrl {
    /// Parse `url` if it is a Sentinel URL: `None` when its scheme is not
    /// `redis+sentinel` or `rediss+sentinel`, an error naming the part that
    /// is wrong when it is but does not parse.
    pub fn parse(url: &str) -> Option<Result<SentinelUrl, String>> {
        let url = url.trim();
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            (true, rest)
        } else {
            return None;
        };
        Some(Self::parse_rest(tls, rest))
    }

    fn parse_rest(tls: bool, rest: &str) -> Result<SentinelUrl, String> {
        const FORM: &str = "expected redis+sentinel://[user:password@]host[:port][,host[:port]...]\
                            /service[/db][?sentinel_password=...]";
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("redis_url: no service name after the sentinels; {FORM}"))?;
        let (node_userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
            None => (None, authority),
        };
        let sentinels = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(with_default_port)
            .collect::<Result<Vec<_>, _>>()?;
        if sentinels.is_empty() {
            return Err(format!("redis_url: no sentinel host; {FORM}"));
        }
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let service = segments
            .next()
            .ok_or_else(|| format!("redis_url: no service name after the sentinels; {FORM}"))?
            .to_owned();
        let db = match segments.next() {
            None => 0,
            Some(db) => db
                .parse()
                .map_err(|_| format!("redis_url: database `{db}` is not a number; {FORM}"))?,
        };
        if let Some(extra) = segments.next() {
            return Err(format!(
                "redis_url: unexpected `/{extra}` after the database; {FORM}"
            ));
        }
        let mut sentinel_username = None;
        let mut sentinel_password = None;
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some(("sentinel_username", v)) => sentinel_username = Some(v),
                Some(("sentinel_password", v)) => sentinel_password = Some(v),
                _ => {
                    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                    return Err(format!(
                        "redis_url: unknown parameter `{key}`; a Sentinel URL takes \
                         sentinel_username and sentinel_password"
                    ));
                }
            }
        }
        let sentinel_userinfo = match (sentinel_username, sentinel_password) {
            (_, None) => None,
            (user, Some(password)) => Some(format!("{}:{password}", user.unwrap_or_default())),
        };
        Ok(SentinelUrl {
            tls,
            sentinels,
            service,
            node_userinfo,
            db,
            sentinel_userinfo,
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "rediss" } else { "redis" }
    }

    /// The `redis://` (or `rediss://`) URL of sentinel `host_port`.
    pub fn sentinel_url(&self, host_port: &str) -> String {
        match &self.sentinel_userinfo {
            Some(userinfo) => format!("{}://{userinfo}@{host_port}", self.scheme()),
            None => format!("{}://{host_port}", self.scheme()),
        }
    }

    /// The `redis://` (or `rediss://`) URL of the node at `host`:`port`,
    /// with the nodes' credentials and database.
    pub fn node_url(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        match &self.node_userinfo {
            Some(userinfo) => format!("{}://{userinfo}@{host}:{port}/{}", self.scheme(), self.db),
            None => format!("{}://{host}:{port}/{}", self.scheme(), self.db),
        }
    }
}

/// `host` with `:26379` appended when it names no port.
fn with_default_port(host: &str) -> Result<String, String> {
    let port_part = match host.rsplit_once(':') {
        // `[::1]` alone: the colon is inside the brackets.
        Some((_, port)) if !port.ends_with(']') => Some(port),
        _ => None,
    };
    match port_part {
        None => Ok(format!("{host}:{SENTINEL_PORT}")),
        Some(port) if port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(host.to_owned()),
        Some(port) => Err(format!(
            "redis_url: sentinel `{host}` has port `{port}`, not a number from 1 to 65535"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<SentinelUrl, String> {
        SentinelUrl::parse(url).unwrap_or_else(|| Err(format!("not a Sentinel URL: {url}")))
    }

    #[test]
    fn only_the_sentinel_schemes_are_sentinel_urls() {
        assert!(SentinelUrl::parse("redis://127.0.0.1:6379/").is_none());
        assert!(SentinelUrl::parse("rediss://h/").is_none());
        assert!(SentinelUrl::parse("redis+sentinel://h/svc").is_some());
        assert!(SentinelUrl::parse("rediss+sentinel://h/svc").is_some());
    }

    #[test]
    fn sentinels_service_and_database_are_read_ports_defaulting_to_26379() {
        let url = parse("redis+sentinel://s1:26380, s2 ,[::1]:26381,[::2]/mymaster/3").unwrap();
        assert_eq!(
            url.sentinels,
            ["s1:26380", "s2:26379", "[::1]:26381", "[::2]:26379"]
        );
        assert_eq!(url.service, "mymaster");
        assert_eq!(url.db, 3);
        assert!(!url.tls);
        assert_eq!(url.sentinel_url("s1:26380"), "redis://s1:26380");
        assert_eq!(url.node_url("10.0.0.5", 6379), "redis://10.0.0.5:6379/3");
        assert_eq!(url.node_url("::5", 6379), "redis://[::5]:6379/3");
    }

    #[test]
    fn node_and_sentinel_credentials_are_kept_apart() {
        let url = parse(
            "rediss+sentinel://app:s%40cret@s1/svc?sentinel_username=watch&sentinel_password=p%26w",
        )
        .unwrap();
        assert!(url.tls);
        assert_eq!(url.db, 0);
        assert_eq!(url.node_url("n", 6380), "rediss://app:s%40cret@n:6380/0");
        assert_eq!(
            url.sentinel_url("s1:26379"),
            "rediss://watch:p%26w@s1:26379"
        );
        let url = parse("redis+sentinel://s1/svc?sentinel_password=x").unwrap();
        assert_eq!(url.sentinel_url("s1:26379"), "redis://:x@s1:26379");
        assert_eq!(url.node_url("n", 1), "redis://n:1/0");
    }

    #[test]
    fn the_debug_form_shows_no_credentials() {
        let url = parse("redis+sentinel://u:hunter2@s1/svc?sentinel_password=hunter3").unwrap();
        let shown = format!("{url:?}");
        assert!(!shown.contains("hunter"), "{shown}");
    }

    #[test]
    fn a_wrong_url_is_refused_naming_the_part_that_is_wrong() {
        let err = |url: &str| parse(url).unwrap_err();
        assert!(err("redis+sentinel://s1").contains("no service name"));
        assert!(err("redis+sentinel://s1/").contains("no service name"));
        assert!(err("redis+sentinel:///svc").contains("no sentinel host"));
        assert!(err("redis+sentinel://s1:port/svc").contains("port `port`"));
        assert!(err("redis+sentinel://s1:0/svc").contains("port `0`"));
        assert!(err("redis+sentinel://s1/svc/x").contains("database `x`"));
        assert!(err("redis+sentinel://s1/svc/1/2").contains("unexpected `/2`"));
        assert!(err("redis+sentinel://s1/svc?password=x").contains("unknown parameter `password`"));
    }
}
