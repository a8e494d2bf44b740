//! The Lua function library every transition runs in: its source (the
//! shared prelude and one body per transition, from `store/lua/`), its
//! name (a digest of the source, so versions can share a Redis) and the
//! order of its functions.

use deadpool_redis::redis::{self, RedisError};

/// The library's shared prelude: per-call state and helpers.
pub(crate) const COMMON: &str = include_str!("../lua/common.lua");

/// Every transition's body, by name, in `Script` order. Each runs as the
/// body of a function after `begin`; its return value is the reply, after
/// the buffered history entries are flushed.
pub const SCRIPT_BODIES: [(&str, &str); 13] = [
    ("create", include_str!("../lua/create.lua")),
    ("reject", include_str!("../lua/reject.lua")),
    ("claim", include_str!("../lua/claim.lua")),
    ("complete", include_str!("../lua/complete.lua")),
    ("promote", include_str!("../lua/promote.lua")),
    ("reclaim", include_str!("../lua/reclaim.lua")),
    ("release", include_str!("../lua/release.lua")),
    ("renew", include_str!("../lua/renew.lua")),
    ("poison", include_str!("../lua/poison.lua")),
    // Calls `body_create` and `body_claim`, so it comes after both.
    ("create_claim", include_str!("../lua/create_claim.lua")),
    ("audit", include_str!("../lua/audit.lua")),
    ("forget_due", include_str!("../lua/forget_due.lua")),
    ("defer_due", include_str!("../lua/defer_due.lua")),
];

/// The function library: its name (`conveyor_` + 16 hex digits of the
/// digest of its code) and its source, as `FUNCTION LOAD` takes it.
pub(super) struct Library {
    pub(super) name: String,
    pub(super) source: String,
}

pub(super) fn library() -> &'static Library {
    static LIBRARY: std::sync::OnceLock<Library> = std::sync::OnceLock::new();
    LIBRARY.get_or_init(|| {
        let mut code = String::from(COMMON);
        for (name, body) in SCRIPT_BODIES {
            code.push_str(&format!("\nlocal function body_{name}()\n{body}\nend\n"));
        }
        code.push_str(
            "\nlocal function call(body)\n  return function(keys, args)\n    begin(keys, args)\n    \
             local reply = body()\n    flush_hist()\n    return reply\n  end\nend\n",
        );
        let digest = sha1_smol::Sha1::from(&code).digest().to_string();
        let name = format!("conveyor_{}", &digest[..16]);
        for (script, _) in SCRIPT_BODIES {
            code.push_str(&format!(
                "redis.register_function('{name}_{script}', call(body_{script}))\n"
            ));
        }
        Library {
            source: format!("#!lua name={name}\n{code}"),
            name,
        }
    })
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Script {
    Create = 0,
    Reject,
    Claim,
    Complete,
    Promote,
    Reclaim,
    Release,
    Renew,
    Poison,
    CreateClaim,
    Audit,
    ForgetDue,
    DeferDue,
}

/// Redis answered that the function called does not exist: it lost the
/// library (restarted without its data, or `FUNCTION FLUSH`).
pub(super) fn is_function_missing(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(_)) && e.to_string().contains("Function not found")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_library_registers_one_function_per_transition_under_a_versioned_name() {
        let lib = library();
        assert!(
            lib.source
                .starts_with(&format!("#!lua name={}\n", lib.name))
        );
        assert_eq!(lib.name.len(), "conveyor_".len() + 16);
        for (name, _) in SCRIPT_BODIES {
            let register = format!(
                "redis.register_function('{}_{name}', call(body_{name}))",
                lib.name
            );
            assert_eq!(lib.source.matches(&register).count(), 1, "{name}");
        }
    }
}
