//! Reading what Redis answers (the functions' replies, `INFO` fields) and
//! the packed run spec a claim reads: the parsing, kept apart from the
//! calls, where each mistake in a reply becomes a `StoreError::Protocol`.

use std::fmt::Write as _;

use deadpool_redis::redis;

use super::protocol;
use crate::intake::PlannedJob;
use crate::model::{JobState, TaskMessage, TaskState};
use crate::store::{Created, StoreError};

/// The `run_id` line of `INFO server`: 40 hex digits, new with every start
/// of a Redis process, so a restart or another node shows as a new one.
pub(super) fn run_id(info: &str) -> Option<&str> {
    info_field(info, "run_id").filter(|id| !id.is_empty())
}

/// Which data a primary serves, from `INFO server` and `INFO
/// replication`: its `run_id` and its `master_replid`, the replication
/// history it started (new with every start and every promotion). The
/// `run_id` alone misses a failover and a failback to the same process:
/// demoted, it took the new primary's data whole (which may lack writes
/// it had), then was promoted again under the `run_id` already audited.
/// `None` without a `run_id`.
pub(super) fn data_identity(info: &str) -> Option<String> {
    let run_id = run_id(info)?;
    Some(
        match info_field(info, "master_replid").filter(|r| !r.is_empty()) {
            Some(replid) => format!("{run_id}/{replid}"),
            None => run_id.to_owned(),
        },
    )
}

/// How many replicas of this primary `INFO replication` shows online (in
/// sync and streaming: `slaveN:...,state=online,...`); `None` if it is no
/// primary's (no `connected_slaves` line). A replica connected but still
/// taking a full copy (`wait_bgsave`, `send_bulk`) counts in
/// `connected_slaves` and acknowledges no `WAIT`: counted, it made
/// readiness say ready while every creation waited in vain.
pub(super) fn replicas_in_info(info: &str) -> Option<u32> {
    info_field(info, "connected_slaves")?;
    let online = info
        .lines()
        .filter(|l| {
            l.strip_prefix("slave").is_some_and(|rest| {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                digits > 0 && rest[digits..].starts_with(':')
            }) && l.split(',').any(|kv| kv.trim() == "state=online")
        })
        .count();
    u32::try_from(online).ok()
}

/// The value of `field` in an `INFO` reply (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

pub(super) type Reply = Vec<Option<String>>;

/// One claim's part of a round's replies: whether its lease entry was
/// added, and its call's reply or error.
pub(super) type ClaimReply = (i64, Result<Reply, StoreError>);

/// The replies of a claim round's pipeline ([`super::RedisStore::claim_round`]),
/// sent with `ignore_errors` so that one call's error (a script failing on
/// one job's record) is that call's alone: `requests` lease entries'
/// (whether added), then one list of claim replies per call of `calls`,
/// handed back per request in round order, each with its own error if its
/// lease entry or its call failed (`classify` says which kind). Only a
/// round whose replies do not have its shape is an error as a whole.
pub(super) fn claim_replies(
    values: Vec<redis::Value>,
    requests: usize,
    calls: &[Vec<usize>],
    classify: impl Fn(redis::RedisError) -> StoreError,
) -> Result<Vec<ClaimReply>, StoreError> {
    if values.len() != requests + calls.len() {
        return Err(protocol(format!(
            "a claim round of {requests} claims in {} calls had {} replies",
            calls.len(),
            values.len()
        )));
    }
    let mut values = values.into_iter();
    let mut out: Vec<ClaimReply> = Vec::with_capacity(requests);
    for value in values.by_ref().take(requests) {
        match value {
            redis::Value::ServerError(e) => out.push((0, Err(classify(e.into())))),
            value => {
                let added: i64 = redis::from_redis_value(value)
                    .map_err(|e| protocol(format!("a claim's lease entry answered {e}")))?;
                out.push((added, Ok(Reply::new())));
            }
        }
    }
    for (call, value) in calls.iter().zip(values) {
        let replies: Result<Vec<Reply>, StoreError> = match value {
            redis::Value::ServerError(e) => Err(classify(e.into())),
            value => {
                redis::from_redis_value(value).map_err(|e| protocol(format!("claim answered {e}")))
            }
        };
        match replies {
            Ok(replies) if replies.len() == call.len() => {
                for (&k, reply) in call.iter().zip(replies) {
                    // A claim whose lease entry failed keeps that error.
                    if out[k].1.is_ok() {
                        out[k].1 = Ok(reply);
                    }
                }
            }
            Ok(replies) => {
                return Err(protocol(format!(
                    "claim answered {} replies for {} claims",
                    replies.len(),
                    call.len()
                )));
            }
            Err(e) => {
                for &k in call {
                    out[k].1 = Err(e.clone());
                }
            }
        }
    }
    Ok(out)
}

/// What a create call answered.
pub(super) fn created_from(job: &PlannedJob, reply: &Reply) -> Result<Created, StoreError> {
    match field(reply, 0) {
        "created" => Ok(Created::New {
            ready: job.roots().map(|i| job.task_message(i)).collect(),
        }),
        "exists" => Ok(Created::Existing {
            state: parse_job_state(field(reply, 1))?,
            ready: ready_set(&job.id, reply, 2)?,
        }),
        other => Err(protocol(format!("create answered {other:?}"))),
    }
}

pub(super) fn field(reply: &[Option<String>], i: usize) -> &str {
    reply.get(i).and_then(|v| v.as_deref()).unwrap_or("")
}

/// What a claim needs to run a task and nothing else reads, packed in one
/// hash field (`x:<i>`) so that a job costs fewer fields, a create fewer
/// arguments and a claim fewer lookups:
/// `<backoff base>,<backoff cap>,<timeout>,<handler length>,<handler><params>`
/// (the length lets a handler name hold any character; the params JSON is
/// the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RunSpec<'a> {
    pub(super) backoff_base_ms: u64,
    pub(super) backoff_cap_ms: u64,
    pub(super) timeout_ms: u64,
    pub(super) handler: &'a str,
    pub(super) params_json: &'a str,
}

impl<'a> RunSpec<'a> {
    pub(super) fn encode(t: &crate::intake::PlannedTask) -> String {
        format!(
            "{},{},{},{},{}{}",
            t.backoff_base_ms,
            t.backoff_cap_ms,
            t.timeout_ms,
            t.handler.len(),
            t.handler,
            t.params_json
        )
    }

    pub(super) fn decode(x: &'a str) -> Result<RunSpec<'a>, StoreError> {
        let bad = || protocol(format!("run spec {:?}", crate::text::cut(x, 80)));
        let mut parts = x.splitn(5, ',');
        let mut next_num = || -> Result<u64, StoreError> {
            parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)
        };
        let (backoff_base_ms, backoff_cap_ms, timeout_ms) = (next_num()?, next_num()?, next_num()?);
        let handler_len = usize::try_from(next_num()?).map_err(|_| bad())?;
        let rest = parts.next().ok_or_else(bad)?;
        if !rest.is_char_boundary(handler_len.min(rest.len())) || handler_len > rest.len() {
            return Err(bad());
        }
        let (handler, params_json) = rest.split_at(handler_len);
        Ok(RunSpec {
            backoff_base_ms,
            backoff_cap_ms,
            timeout_ms,
            handler,
            params_json,
        })
    }
}

pub(super) fn num<T: std::str::FromStr>(
    reply: &[Option<String>],
    i: usize,
    what: &str,
) -> Result<T, StoreError> {
    field(reply, i)
        .parse()
        .map_err(|_| protocol(format!("{what}: not a number: {:?}", field(reply, i))))
}

/// `{idx, name, queue, attempt}*` from `start` on, as task messages.
pub(super) fn ready_set(
    job: &str,
    reply: &Reply,
    start: usize,
) -> Result<Vec<TaskMessage>, StoreError> {
    let rest = reply.get(start..).unwrap_or(&[]);
    if rest.len() % 4 != 0 {
        return Err(protocol("ready set is not a list of 4-tuples"));
    }
    rest.chunks(4)
        .map(|c| {
            Ok(TaskMessage {
                job: job.to_owned(),
                idx: num(c, 0, "ready idx")?,
                task: field(c, 1).to_owned(),
                queue: field(c, 2).to_owned(),
                attempt: num(c, 3, "ready attempt")?,
            })
        })
        .collect()
}

pub(super) fn parse_job_state(s: &str) -> Result<JobState, StoreError> {
    s.parse().map_err(|e| protocol(format!("{e}")))
}

pub(super) fn parse_task_state(s: &str) -> Result<TaskState, StoreError> {
    s.parse().map_err(|e| protocol(format!("{e}")))
}

/// `v` as a comma-separated list, in `buf` (overwritten).
pub(super) fn join_indexes<'a>(buf: &'a mut String, v: &[u32]) -> &'a str {
    buf.clear();
    for (k, x) in v.iter().enumerate() {
        if k > 0 {
            buf.push(',');
        }
        let _ = write!(buf, "{x}");
    }
    buf.as_str()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_run_spec_round_trips_whatever_the_handler_name_and_params_hold() {
        let task = crate::intake::PlannedTask {
            name: "t".into(),
            handler: "odd,name:ü".into(),
            queue: "default".into(),
            params_json: r#"{"a":"1,2","b":[3]}"#.into(),
            deps: vec![],
            dependents: vec![],
            max_attempts: 5,
            backoff_base_ms: 100,
            backoff_cap_ms: 60_000,
            timeout_ms: 30_000,
        };
        let x = RunSpec::encode(&task);
        assert_eq!(
            RunSpec::decode(&x).ok(),
            Some(RunSpec {
                backoff_base_ms: 100,
                backoff_cap_ms: 60_000,
                timeout_ms: 30_000,
                handler: "odd,name:ü",
                params_json: r#"{"a":"1,2","b":[3]}"#,
            })
        );
        for bad in [
            "",
            "1,2,3",
            "1,2,x,3,noop{}",
            "1,2,3,99,noop{}",
            "1,2,3,1,ü{}",
        ] {
            assert!(RunSpec::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_data_is_named_by_the_servers_run_id_and_its_replication_history() {
        let info = "# Server\r\nrun_id:3f2a9c\r\n\r\n# Replication\r\nrole:master\r\n\
                    master_replid:77aa\r\nmaster_replid2:0000\r\n";
        assert_eq!(data_identity(info).as_deref(), Some("3f2a9c/77aa"));
        // Promoted again after a failover: the same process, new history.
        let promoted = info.replace("master_replid:77aa", "master_replid:88bb");
        assert_eq!(data_identity(&promoted).as_deref(), Some("3f2a9c/88bb"));
        assert_eq!(
            data_identity("# Server\r\nrun_id:3f2a9c\r\n").as_deref(),
            Some("3f2a9c")
        );
        assert_eq!(
            data_identity("# Replication\r\nmaster_replid:77aa\r\n"),
            None
        );
    }

    #[test]
    fn the_server_is_named_by_the_run_id_line_of_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:3f2a9c\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("3f2a9c"));
        assert_eq!(run_id("# Server\r\nrun_id:\r\n"), None);
        assert_eq!(run_id("# Server\r\nredis_version:7.0.15\r\n"), None);
        assert_eq!(run_id("# Server\r\nrun_id_old:3f\r\n"), None);
    }

    #[test]
    fn the_replicas_of_a_primary_are_counted_by_info_replication_when_online() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
                    slave0:ip=127.0.0.1,port=7001,state=online,offset=42,lag=0\r\n\
                    slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\n\
                    slave2:ip=127.0.0.1,port=7003,state=online,offset=42,lag=1\r\n\
                    master_failover_state:no-failover\r\n";
        assert_eq!(
            replicas_in_info(info),
            Some(2),
            "the resyncing one left out"
        );
        assert_eq!(replicas_in_info("# Replication\r\nrole:slave\r\n"), None);
        assert_eq!(
            replicas_in_info("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"),
            Some(0)
        );
    }
}
