//! Job files as `submit` and `run` send them: read, given an id when they
//! have none (so the command can follow the job), and checked for what
//! would keep the job from ever appearing under that id — a file over the
//! size limit or not JSON is dead-lettered, one that is not a JSON object
//! or has an id the dispatcher cannot use is rejected under a generated
//! id. Those are told at once, instead of waited for until the time-out.

use std::path::Path;

use anyhow::Context;
use conveyor::config::Config;
use conveyor::names::Names;
use serde_json::Value;

/// A job file ready to publish.
pub struct JobFile {
    /// The message body: the file, with an `id` added if it had none.
    pub body: Vec<u8>,
    /// The id the job will be recorded under, or why it will not be.
    pub follow: Result<String, Unfollowable>,
}

/// Why a job file's job will not be recorded under its id (`why`), and
/// what becomes of it instead once published (`then`): `submit` publishes
/// it all the same and says both; `run` publishes nothing, and says why.
#[derive(Debug)]
pub struct Unfollowable {
    pub why: String,
    pub then: String,
}

impl std::fmt::Display for Unfollowable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, so {}", self.why, self.then)
    }
}

/// Read `path` and prepare it for submission under `config`.
pub fn read(path: &Path, config: &Config) -> anyhow::Result<JobFile> {
    let text = read_bounded(path, LARGEST_JOB_FILE)?;
    Ok(prepare(text, config))
}

/// The largest job file read: RabbitMQ's own largest message by default
/// (`max_message_size`, 128 MiB). A larger file (a log named by mistake,
/// a device) is refused before it is read whole; one over
/// `max_message_bytes` but under this is published all the same, to be
/// dead-lettered as any client's would be.
pub const LARGEST_JOB_FILE: u64 = 128 << 20;

/// The bytes of `path`, if it has at most `largest`: read no further than
/// that, so a huge file or an endless one (`/dev/zero`) costs no more.
pub fn read_bounded(path: &Path, largest: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let cannot = || format!("cannot read {}", path.display());
    let file = std::fs::File::open(path).with_context(cannot)?;
    let mut text = Vec::new();
    file.take(largest.saturating_add(1))
        .read_to_end(&mut text)
        .with_context(cannot)?;
    if text.len() as u64 > largest {
        anyhow::bail!(
            "{} is larger than {largest} bytes, the most a job file may have \
             (RabbitMQ takes no larger message by default; a job's own limit is \
             max_message_bytes)",
            path.display()
        );
    }
    Ok(text)
}

fn prepare(text: Vec<u8>, config: &Config) -> JobFile {
    let dead = Names::new(&config.prefix).dead_queue();
    let too_large = |len: usize| Unfollowable {
        why: format!(
            "it is {len} bytes; the limit (max_message_bytes) is {}",
            config.max_message_bytes
        ),
        then: format!("it is dead-lettered to {dead}"),
    };
    let rejected = |why: String| Unfollowable {
        why,
        then: "the dispatcher rejects the job under a generated id".to_owned(),
    };
    if text.len() > config.max_message_bytes {
        let why = too_large(text.len());
        return refused(text, why);
    }
    let mut job = match serde_json::from_slice::<Value>(&text) {
        Ok(Value::Object(job)) => job,
        Ok(_) => {
            return refused(text, rejected("it is JSON, not an object".to_owned()));
        }
        Err(e) => {
            let why = Unfollowable {
                why: format!("it is not JSON ({e})"),
                then: format!("it is dead-lettered to {dead}"),
            };
            return refused(text, why);
        }
    };
    let (body, id) = match job.get("id") {
        None => {
            let id = conveyor::intake::new_job_id();
            job.insert("id".into(), Value::String(id.clone()));
            (serde_json::to_vec(&job).unwrap_or(text), id)
        }
        Some(Value::String(id)) => {
            if let Err(why) = conveyor::intake::check_job_id(id, config.limits.max_name_len) {
                return refused(text, rejected(why.to_string()));
            }
            (text, id.clone())
        }
        Some(other) => {
            return refused(text, rejected(format!("id: {other} is not a string")));
        }
    };
    if body.len() > config.max_message_bytes {
        let why = too_large(body.len());
        return refused(body, why);
    }
    JobFile {
        body,
        follow: Ok(id),
    }
}

fn refused(body: Vec<u8>, why: Unfollowable) -> JobFile {
    JobFile {
        body,
        follow: Err(why),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            max_message_bytes: 1024,
            ..Config::default()
        }
    }

    #[test]
    fn a_file_larger_than_the_most_a_job_file_may_have_is_refused_unread() {
        let dir = std::env::temp_dir().join(format!("conveyor-jobfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.json");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_bounded(&path, 10).unwrap(), b"0123456789");
        let e = read_bounded(&path, 9).unwrap_err().to_string();
        assert!(e.contains("larger than 9 bytes"), "{e}");
        // An endless file is read no further than the bound.
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_without_an_id_is_given_one_to_follow() {
        let file = prepare(br#"{"requestor": "r", "tasks": []}"#.to_vec(), &config());
        let id = file.follow.unwrap();
        let body: Value = serde_json::from_slice(&file.body).unwrap();
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["requestor"], "r");
    }

    #[test]
    fn a_file_with_a_usable_id_is_sent_unchanged() {
        let text = br#"{"id": "mine", "requestor": "r", "tasks": []}"#.to_vec();
        let file = prepare(text.clone(), &config());
        assert_eq!(file.follow.unwrap(), "mine");
        assert_eq!(file.body, text);
    }

    #[test]
    fn what_would_never_be_recorded_under_the_files_id_says_what_happens_instead() {
        let cases: [(&[u8], &str); 5] = [
            (br#"{"id": 5, "tasks": []}"#, "id: 5 is not a string"),
            (
                br#"{"id": "bad id", "tasks": []}"#,
                "rejects the job under a generated id",
            ),
            (b"[1, 2]", "JSON, not an object"),
            (b"{oops", "dead-lettered to conveyor.dead"),
            (&[b' '; 2000], "the limit (max_message_bytes) is 1024"),
        ];
        for (text, says) in cases {
            let file = prepare(text.to_vec(), &config());
            let why = file.follow.unwrap_err().to_string();
            assert!(why.contains(says), "{why}");
            assert_eq!(file.body, text, "sent as it is");
        }
    }

    #[test]
    fn an_id_added_to_a_file_just_under_the_limit_is_measured_after() {
        let pad = "x".repeat(1024 - 40);
        let text = format!(r#"{{"requestor": "{pad}"}}"#);
        assert!(text.len() <= 1024);
        let why = prepare(text.into_bytes(), &config()).follow.unwrap_err();
        assert!(why.why.contains("max_message_bytes"), "{why}");
    }
}
