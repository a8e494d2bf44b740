//! Files a test leaves on disk (journals, logs, data directories of the
//! servers it starts) live under the system temp directory for as long as
//! the test runs; a test that passes removes them, one that fails keeps them
//! and names them on stderr for the post-mortem.

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A path in the temp directory, removed when dropped outside a panic.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    dir: bool,
}

impl Scratch {
    /// A fresh, empty directory named `conveyor-<name>-<random>`.
    pub fn dir(name: &str) -> Scratch {
        let path = unique(name);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Scratch { path, dir: true }
    }

    /// A path for a file `conveyor-<name>-<random>` (not created).
    pub fn file(name: &str) -> Scratch {
        Scratch {
            path: unique(name),
            dir: false,
        }
    }
}

fn unique(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("conveyor-{name}-{:08x}", rand::random::<u32>()))
}

impl Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "kept {} for inspection (the test failed)",
                self.path.display()
            );
            return;
        }
        let removed = if self.dir {
            std::fs::remove_dir_all(&self.path)
        } else {
            std::fs::remove_file(&self.path)
        };
        if let Err(e) = removed
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("could not remove {}: {e}", self.path.display());
        }
    }
}
