//! Removing a deployment's traces: its queues on the broker and its keys in
//! Redis. Used by `conveyor bench` for its scratch deployments and by the
//! test suites for theirs; errors are ignored, as there is nothing to do
//! about a queue or key that will not go.

use lapin::options::QueueDeleteOptions;
use lapin::types::ShortString;

use crate::config::Config;

/// Delete `queues` (each on its own channel: a failed delete closes it)
/// through the first node of `config.amqp_url` that accepts a connection
/// (with its `tls_ca_file`).
pub async fn delete_queues(config: &Config, queues: &[String]) {
    let Ok(conn) = crate::broker::amqp::tool_connection(config).await else {
        return;
    };
    for q in queues {
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "deleted".into()).await;
        }
    }
    let _ = conn.close(200, "purged".into()).await;
}

/// Delete every Redis key under `<config.prefix>:` (SCAN + UNLINK, never
/// KEYS, so a shared Redis is not blocked).
pub async fn delete_keys(config: &Config) {
    let Ok(client) = crate::store::redis::tool_client(config).await else {
        return;
    };
    let prefix = &config.prefix;
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    loop {
        let page: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await;
        let Ok((next, found)) = page else {
            return;
        };
        if !found.is_empty() {
            let _: Result<i64, _> = redis::cmd("UNLINK")
                .arg(&found)
                .query_async(&mut conn)
                .await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
