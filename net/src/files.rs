//! Reading the files an operator names (certificates, keys, the config
//! file, word lists) with a bound on their size.
//!
//! The bound is enforced by the read itself, never by a size looked up
//! first: a character or block device (`/dev/zero`, a disk given by
//! mistake) reports a size of 0 and never ends, and a file may grow
//! between a `stat` and the read. Either would otherwise be read until
//! memory runs out, at startup or on a reload.

use std::io::{self, Read};
use std::path::Path;

/// The bytes of `path` if it holds at most `max` of them; `Ok(None)` if it
/// holds more (only `max + 1` bytes are read to find out).
pub fn read_at_most(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_at_the_bound_is_read_and_one_past_it_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_at_most(&path, 5).unwrap(), Some(b"12345".to_vec()));
        assert_eq!(read_at_most(&path, 4).unwrap(), None);
        assert!(read_at_most(&dir.path().join("missing"), 5).is_err());
    }

    #[test]
    fn a_device_that_never_ends_is_refused_after_the_bound() {
        assert_eq!(read_at_most(Path::new("/dev/zero"), 1024).unwrap(), None);
    }
}
