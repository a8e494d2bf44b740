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
        // The nodes' credentials run to the last '@' before the query, as
        // `redact_url` hides them. (Cut from the path at the first '/'
        // first, a password holding an unencoded '/' was read as a
        // sentinel, `app:pa` with port `pa`, and quoted in the error.) The
        // query starts at the first '?' after a '/': an '@' from there on
        // is a query value's (a sentinel password's).
        let query_start = rest
            .find('/')
            .and_then(|slash| rest[slash..].find('?').map(|q| slash + q))
            .unwrap_or(rest.len());
        let (node_userinfo, rest) = match rest[..query_start].rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        // Such a password is refused, not guessed at: the node URL built
        // from it would be read otherwise by the Redis client. (An `@` is
        // not: the client, too, takes the credentials to the last one.)
        if node_userinfo.is_some_and(|u| u.contains(['/', '?', '#'])) {
            return Err(
                "redis_url: the nodes' user or password holds `/`, `?` or `#` unencoded; \
                 percent-encode them (%2F, %3F, %23)"
                    .to_owned(),
            );
        }
        let node_userinfo = node_userinfo.map(str::to_owned);
        // From here on, errors quote nothing of the URL: what a malformed
        // URL puts where a host, a database or a parameter should be may be
        // a piece of a password.
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("redis_url: no service name after the sentinels; {FORM}"))?;
        let hosts: Vec<&str> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        let sentinels = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                with_default_port(host).ok_or_else(|| {
                    format!(
                        "redis_url: sentinel {} of {} has a port that is not a number from \
                         1 to 65535",
                        i + 1,
                        hosts.len()
                    )
                })
            })
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
            Some(db) => db.parse().map_err(|_| {
                format!("redis_url: the database after the service is not a number; {FORM}")
            })?,
        };
        if segments.next().is_some() {
            return Err(format!(
                "redis_url: more than a service and a database after the sentinels; {FORM}"
            ));
        }
        let mut sentinel_username = None;
        let mut sentinel_password = None;
        for (i, pair) in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            match pair.split_once('=') {
                Some(("sentinel_username", v)) => sentinel_username = Some(v),
                Some(("sentinel_password", v)) => sentinel_password = Some(v),
                // Not quoted: a password holding an unencoded '&' makes its
                // tail look like a parameter of its own.
                _ => {
                    return Err(format!(
                        "redis_url: parameter {} of the query is neither sentinel_username \
                         nor sentinel_password (the only ones a Sentinel URL takes; \
                         percent-encode `&` and `=` in a password)",
                        i + 1
                    ));
                }
            }
        }
        // Each goes into a sentinel's URL as its user and password: an
        // unencoded '/', '?' or '#' there would end them early and be read
        // as the host or the path (`x@h/0` connected to host `h`). An '@'
        // is not: the client takes the credentials to the last one.
        if [sentinel_username, sentinel_password]
            .iter()
            .flatten()
            .any(|v| v.contains(['/', '?', '#']))
        {
            return Err(
                "redis_url: sentinel_username or sentinel_password holds `/`, `?` or `#` \
                 unencoded; percent-encode them (%2F, %3F, %23)"
                    .to_owned(),
            );
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

/// `host` with `:26379` appended when it names no port; `None` when the
/// port it names is not one.
fn with_default_port(host: &str) -> Option<String> {
    let port_part = match host.rsplit_once(':') {
        // `[::1]` alone: the colon is inside the brackets.
        Some((_, port)) if !port.ends_with(']') => Some(port),
        _ => None,
    };
    match port_part {
        None => Some(format!("{host}:{SENTINEL_PORT}")),
        Some(port) if port.parse::<u16>().is_ok_and(|p| p > 0) => Some(host.to_owned()),
        Some(_) => None,
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
        assert!(
            err("redis+sentinel://s1,s2:port/svc")
                .contains("sentinel 2 of 2 has a port that is not a number")
        );
        assert!(err("redis+sentinel://s1:0/svc").contains("sentinel 1 of 1 has a port"));
        assert!(err("redis+sentinel://s1/svc/x").contains("the database after the service"));
        assert!(err("redis+sentinel://s1/svc/1/2").contains("more than a service and a database"));
        assert!(
            err("redis+sentinel://s1/svc?sentinel_password=x&password=y")
                .contains("parameter 2 of the query is neither")
        );
    }

    /// Until the thirty-second session the sentinels were cut from the
    /// path at the first '/', before the credentials were looked for, so
    /// `app:pa/ss@s1/svc` read as sentinel `app:pa` and its error said
    /// "sentinel `app:pa` has port `pa`"; and an unknown parameter was
    /// quoted, which for a password holding an unencoded '&' is its tail.
    #[test]
    fn no_error_quotes_a_piece_of_a_password() {
        for (url, says) in [
            (
                "redis+sentinel://app:sekr/et9@s1/svc",
                "percent-encode them",
            ),
            (
                "redis+sentinel://app:sekr?et9@s1/svc",
                "percent-encode them",
            ),
            (
                "redis+sentinel://app:sekr#et9@s1/svc",
                "percent-encode them",
            ),
            // '/' and '?' both: read as a query; still nothing quoted.
            (
                "redis+sentinel://app:123/sekr?et9@s1/svc",
                "parameter 1 of the query",
            ),
            (
                "redis+sentinel://s1/svc?sentinel_password=sekr&et9",
                "parameter 2 of the query",
            ),
            // Thirty-fifth session: these made a sentinel URL whose host
            // was a piece of the password (`x@h/0` connected to `h`).
            (
                "redis+sentinel://s1/svc?sentinel_password=sekr/et9",
                "percent-encode them",
            ),
            (
                "redis+sentinel://s1/svc?sentinel_password=x@h/sekret9",
                "percent-encode them",
            ),
            (
                "redis+sentinel://s1/svc?sentinel_username=sek#ret9&sentinel_password=x",
                "percent-encode them",
            ),
            (
                "redis+sentinel://app:x@s1:sekret9/svc",
                "sentinel 1 of 1 has a port",
            ),
            (
                "redis+sentinel://s1/svc/sekret9",
                "the database after the service",
            ),
        ] {
            let error = err_of(url);
            assert!(error.contains(says), "{url}: {error}");
            assert!(
                !error.contains("sekr") && !error.contains("et9"),
                "{url}: {error}"
            );
        }
    }

    fn err_of(url: &str) -> String {
        parse(url).unwrap_err()
    }

    /// The credentials end at the last '@' before the query; an '@' in the
    /// query is a sentinel password's.
    #[test]
    fn an_at_sign_in_a_sentinel_password_is_the_querys() {
        // In the nodes' password, the last '@' ends it (as the Redis
        // client reads the node URL built from it).
        let url = parse("redis+sentinel://app:p@ss@s1/svc").unwrap();
        assert_eq!(url.sentinels, ["s1:26379"]);
        assert_eq!(url.node_url("n", 1), "redis://app:p@ss@n:1/0");
        let url = parse("redis+sentinel://app:x@s1/svc?sentinel_password=p@ss").unwrap();
        assert_eq!(url.sentinels, ["s1:26379"]);
        assert_eq!(url.node_url("n", 1), "redis://app:x@n:1/0");
        assert_eq!(url.sentinel_url("s1:26379"), "redis://:p@ss@s1:26379");
        // With a '/' too, the sentinel's URL would be read with host `b`:
        // refused (thirty-fifth session; it connected to `b`).
        assert!(
            parse("redis+sentinel://s1/svc?sentinel_password=a@b/c")
                .unwrap_err()
                .contains("percent-encode")
        );
    }
}
