//! Removing a deployment's traces: its queues on the broker and its keys in
//! Redis. Used by `conveyor bench` for its scratch deployments and by the
//! test suites for theirs; errors are ignored, as there is nothing to do
//! about a queue or key that will not go.

use std::future::Future;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::types::ShortString;

use crate::config::Config;

/// Longest wait for any one broker or Redis call here: a purge is
/// housekeeping, and one that waits for ever (a queue whose replicas are
/// still starting after a broker restart, a connection gone quiet) would
/// hold up whatever finishes with it.
const PURGE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `call`, or `None` when it fails or takes longer than
/// [`PURGE_CALL_TIMEOUT`].
async fn bounded<T, E>(call: impl Future<Output = Result<T, E>>) -> Option<T> {
    tokio::time::timeout(PURGE_CALL_TIMEOUT, call)
        .await
        .ok()?
        .ok()
}

/// Delete `queues` (each on its own channel: a failed delete closes it)
/// through the first node of `config.amqp_url` that accepts a connection
/// (with its `tls_ca_file`). Stops at the first call the broker does not
/// answer in time.
pub async fn delete_queues(config: &Config, queues: &[String]) {
    let Ok(conn) = crate::broker::amqp::tool_connection(config).await else {
        return;
    };
    for q in queues {
        let Some(channel) = bounded(conn.create_channel()).await else {
            break;
        };
        let deleted = tokio::time::timeout(
            PURGE_CALL_TIMEOUT,
            channel.queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default()),
        )
        .await;
        if deleted.is_err() {
            break;
        }
        let _ = bounded(channel.close(200, "deleted".into())).await;
    }
    let _ = bounded(conn.close(200, "purged".into())).await;
}

/// Delete every Redis key under `<config.prefix>:` (SCAN + UNLINK, never
/// KEYS, so a shared Redis is not blocked).
pub async fn delete_keys(config: &Config) {
    let Ok(client) = crate::store::redis::tool_client(config).await else {
        return;
    };
    let prefix = &config.prefix;
    let Some(mut conn) = bounded(client.get_multiplexed_async_connection()).await else {
        return;
    };
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    loop {
        let page: Option<(u64, Vec<String>)> = bounded(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn),
        )
        .await;
        let Some((next, found)) = page else {
            return;
        };
        if !found.is_empty() {
            let _: Option<i64> =
                bounded(redis::cmd("UNLINK").arg(&found).query_async(&mut conn)).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
