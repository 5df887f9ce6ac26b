//! The content filter: an optional word list that text messages are
//! checked against, in mode `reject` or `mask`, reloadable while running.
//!
//! This module owns the word list file format (one word or phrase per
//! line, `#` comments and blank lines ignored, matched case-insensitively
//! in any script, by Unicode's full case folding (`STRASSE` matches
//! `straße`), and only as whole words), the Aho-Corasick automaton
//! built from it, and how a shard reads it without a lock: the list lives
//! behind a `Mutex<Arc<_>>` that only a reload writes, beside a generation
//! counter; each connection keeps its own `Arc` and a copy of the
//! generation ([`FilterCache`]), so a message costs one atomic load of a
//! cache line nobody writes, and the mutex is taken only by the first
//! message after a reload. A reload that fails (unreadable file, too many
//! words) leaves the old list in service.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aho_corasick::AhoCorasick;
use caseless::Caseless;

/// Largest word list file read.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Most words (lines) a list may hold.
pub const MAX_WORDS: usize = 100_000;
/// Longest word or phrase, in bytes.
pub const MAX_WORD_BYTES: usize = 256;

/// What happens to a message that matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterMode {
    /// The send is refused with `ContentRejected`.
    Reject,
    /// The matches are replaced by `*` (one per character) and the
    /// message goes out.
    Mask,
}

impl FilterMode {
    /// The mode's name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            FilterMode::Reject => "reject",
            FilterMode::Mask => "mask",
        }
    }
}

/// One loaded word list.
struct WordList {
    matcher: Option<AhoCorasick>,
    words: usize,
}

impl WordList {
    fn load(path: &Path) -> Result<WordList, String> {
        let Some(bytes) = tern_net::files::read_at_most(path, MAX_FILE_BYTES)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        else {
            return Err(format!(
                "{} has more than the {MAX_FILE_BYTES} bytes a word list may have",
                path.display()
            ));
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("cannot read {}: not UTF-8 text", path.display()))?;
        let mut words = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let word = line.trim();
            if word.is_empty() || word.starts_with('#') {
                continue;
            }
            if word.len() > MAX_WORD_BYTES {
                return Err(format!(
                    "{} line {}: a word may have at most {MAX_WORD_BYTES} bytes",
                    path.display(),
                    n + 1
                ));
            }
            words.push(case_fold(word));
            if words.len() > MAX_WORDS {
                return Err(format!("{} has more than {MAX_WORDS} words", path.display()));
            }
        }
        let matcher = if words.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    .build(&words)
                    .map_err(|e| format!("cannot build the word list of {}: {e}", path.display()))?,
            )
        };
        Ok(WordList {
            matcher,
            words: words.len(),
        })
    }
}

/// The shared filter: its file, mode and current word list.
pub struct ContentFilter {
    path: PathBuf,
    mode: FilterMode,
    generation: AtomicU64,
    current: Mutex<Arc<WordList>>,
}

impl std::fmt::Debug for ContentFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentFilter")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("words", &self.words())
            .finish()
    }
}

impl ContentFilter {
    /// Loads the word list at `path`.
    pub fn open(path: impl Into<PathBuf>, mode: FilterMode) -> Result<ContentFilter, String> {
        let path = path.into();
        let list = WordList::load(&path)?;
        Ok(ContentFilter {
            path,
            mode,
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(list)),
        })
    }

    /// Re-reads the file (SIGHUP in `ternd`) and returns the number of
    /// words now in service. Messages checked after this returns use the
    /// new list; on error the old one stays.
    pub fn reload(&self) -> Result<usize, String> {
        let list = WordList::load(&self.path)?;
        let words = list.words;
        *self.lock() = Arc::new(list);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(words)
    }

    /// The file the list is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What happens to a matching message.
    pub fn mode(&self) -> FilterMode {
        self.mode
    }

    /// Words in the current list.
    pub fn words(&self) -> usize {
        self.lock().words
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<WordList>> {
        // The guarded value is replaced whole, never left half-written, so
        // a poisoned lock still holds a valid list.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reloads `filter` if there is one and logs the outcome: the call for a
/// SIGHUP handler.
pub fn reload_and_log(filter: Option<&Arc<ContentFilter>>) {
    let Some(filter) = filter else { return };
    match filter.reload() {
        Ok(words) => tracing::info!(words, path = %filter.path().display(), "reloaded the content filter"),
        Err(e) => tracing::error!(error = %e, "content filter reload failed; the old word list stays"),
    }
}

/// `text` case-folded, character by character (Unicode's full case
/// folding: `ß` and `ẞ` become `ss`, `ﬁ` becomes `fi`, `ς` becomes `σ`,
/// the Kelvin sign `k`).
fn case_fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    fold_into(text, &mut out);
    out
}

/// `c` case-folded: one to three characters.
fn fold(c: char) -> caseless::CaseFold<std::iter::Once<char>> {
    std::iter::once(c).default_case_fold()
}

/// A connection's copy of the current list.
#[derive(Default)]
pub struct FilterCache {
    seen: Option<(u64, Arc<WordList>)>,
}

thread_local! {
    /// Where a thread case-folds non-ASCII bodies: one buffer per shard
    /// thread, not per connection (an idle connection keeps none), reused
    /// so a message allocates nothing new once it has grown.
    static FOLDED: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Fills `out` with `text` case-folded (as [`case_fold`] does).
fn fold_into(text: &str, out: &mut String) {
    out.clear();
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(fold(c));
        }
    }
}

/// `ranges` of `text` case-folded by [`fold_into`], as byte ranges of
/// `text` itself: each covers the whole characters its bytes came from.
/// Walks `text` once; needed only when there is something to mask.
fn ranges_in_original(text: &str, mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    // Every range boundary, in folded bytes, mapped in one pass: a start
    // to the start of its character, an end to the end of the character
    // holding its last byte.
    let mut starts: Vec<(usize, usize)> = ranges.iter().enumerate().map(|(i, r)| (r.0, i)).collect();
    let mut ends: Vec<(usize, usize)> = ranges.iter().enumerate().map(|(i, r)| (r.1, i)).collect();
    starts.sort_unstable();
    ends.sort_unstable();
    let (mut next_start, mut next_end) = (0, 0);
    let mut folded_at = 0;
    for (at, c) in text.char_indices() {
        let folded_len: usize = if c.is_ascii() {
            1
        } else {
            fold(c).map(char::len_utf8).sum()
        };
        let folded_end = folded_at + folded_len;
        while let Some(&(start, i)) = starts.get(next_start) {
            if start >= folded_end {
                break;
            }
            if let Some(r) = ranges.get_mut(i) {
                r.0 = at;
            }
            next_start += 1;
        }
        while let Some(&(end, i)) = ends.get(next_end) {
            if end > folded_end {
                break;
            }
            if let Some(r) = ranges.get_mut(i) {
                r.1 = at + c.len_utf8();
            }
            next_end += 1;
        }
        folded_at = folded_end;
    }
    ranges
}

/// What the filter did to a message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No word matched.
    Clean,
    /// Words matched and were replaced by `*`.
    Masked,
    /// A word matched and the mode is `reject`.
    Rejected,
}

impl FilterCache {
    /// Checks (and in mask mode rewrites) a text body.
    pub fn apply(&mut self, filter: &ContentFilter, body: &mut Vec<u8>) -> Outcome {
        let generation = filter.generation.load(Ordering::Acquire);
        let list = match &self.seen {
            Some((seen, list)) if *seen == generation => list,
            _ => {
                let list = filter.lock().clone();
                &self.seen.insert((generation, list)).1
            }
        };
        let Some(matcher) = &list.matcher else {
            return Outcome::Clean;
        };
        // ASCII bodies (most) are matched as they are, the automaton
        // ignoring ASCII case. Other UTF-8 text is case-folded first (even
        // for a list of ASCII words: `ß` folds to `ss`), and the matches
        // are mapped back to the characters they came from. Bodies are
        // bytes, not checked UTF-8: others match as ASCII.
        let text = if body.is_ascii() {
            None
        } else {
            std::str::from_utf8(body).ok()
        };
        let found = match text {
            Some(text) => FOLDED.with(|folded| {
                let mut folded = folded.borrow_mut();
                fold_into(text, &mut folded);
                let found = match find(matcher, filter.mode, folded.as_bytes()) {
                    Found::Mask(ranges) => Found::Mask(ranges_in_original(text, ranges)),
                    other => other,
                };
                if folded.capacity() > FOLDED_KEEP_BYTES {
                    // One long message must not pin its buffer forever.
                    *folded = String::new();
                }
                found
            }),
            None => find(matcher, filter.mode, body),
        };
        match found {
            Found::Nothing => Outcome::Clean,
            Found::Reject => Outcome::Rejected,
            Found::Mask(ranges) => {
                *body = mask(body, &ranges);
                Outcome::Masked
            }
        }
    }
}

/// The most bytes of case-folded text a thread keeps between messages.
const FOLDED_KEEP_BYTES: usize = 4096;

/// What [`find`] found.
enum Found {
    Nothing,
    Reject,
    /// The byte ranges to mask.
    Mask(Vec<(usize, usize)>),
}

/// The whole-word matches in `haystack`, as `mode` wants them: the first
/// one rejects; in mask mode, all of them as byte ranges of `haystack`.
fn find(matcher: &AhoCorasick, mode: FilterMode, haystack: &[u8]) -> Found {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for m in matcher.find_overlapping_iter(haystack) {
        if !whole_word(haystack, m.start(), m.end()) {
            continue;
        }
        if mode == FilterMode::Reject {
            return Found::Reject;
        }
        ranges.push((m.start(), m.end()));
    }
    if ranges.is_empty() {
        Found::Nothing
    } else {
        Found::Mask(ranges)
    }
}

/// Letters, digits and every non-ASCII byte count as word characters.
fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b >= 0x80
}

/// Whether `body[start..end]` does not start or end inside a longer word.
fn whole_word(body: &[u8], start: usize, end: usize) -> bool {
    let inside = |a: Option<&u8>, b: Option<&u8>| matches!((a, b), (Some(&a), Some(&b)) if is_word_byte(a) && is_word_byte(b));
    let before = start.checked_sub(1).and_then(|i| body.get(i));
    let after_last = end.checked_sub(1).and_then(|i| body.get(i));
    !inside(before, body.get(start)) && !inside(after_last, body.get(end))
}

/// `body` with every character inside a range replaced by one `*`.
///
/// Linear in the body plus the ranges: a body of thousands of short
/// listed words gives thousands of ranges, and testing each byte against
/// each range would cost the shard's thread their product. Each range
/// adds one at its start and takes one away at its end; a byte is inside
/// some range while the running sum is positive.
fn mask(body: &[u8], ranges: &[(usize, usize)]) -> Vec<u8> {
    let mut edges = vec![0i32; body.len() + 1];
    for &(start, end) in ranges {
        let (start, end) = (start.min(body.len()), end.min(body.len()));
        if start < end {
            if let Some(e) = edges.get_mut(start) {
                *e += 1;
            }
            if let Some(e) = edges.get_mut(end) {
                *e -= 1;
            }
        }
    }
    let mut out = Vec::with_capacity(body.len());
    let mut depth = 0i32;
    for (&b, &edge) in body.iter().zip(&edges) {
        depth += edge;
        if depth > 0 {
            // One star per character: UTF-8 continuation bytes add none.
            if !(0x80..0xc0).contains(&b) {
                out.push(b'*');
            }
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(words: &str, mode: FilterMode) -> (tempfile::TempDir, ContentFilter) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("words.txt");
        std::fs::write(&path, words).unwrap();
        let f = ContentFilter::open(&path, mode).unwrap();
        (dir, f)
    }

    fn run(f: &ContentFilter, text: &str) -> (Outcome, String) {
        let mut body = text.as_bytes().to_vec();
        let outcome = FilterCache::default().apply(f, &mut body);
        (outcome, String::from_utf8(body).unwrap())
    }

    #[test]
    fn a_list_too_large_or_a_device_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.txt");
        std::fs::write(&big, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        for path in [big.as_path(), Path::new("/dev/zero")] {
            let err = ContentFilter::open(path, FilterMode::Reject).unwrap_err();
            assert!(err.contains("more than"), "{err}");
        }
    }

    #[test]
    fn masks_whole_words_case_insensitively() {
        let (_d, f) = filter("# comment\n\ndarn\nheck it\nné\n", FilterMode::Mask);
        assert_eq!(f.words(), 3);
        assert_eq!(
            run(&f, "Darn, HECK IT!"),
            (Outcome::Masked, "****, *******!".into())
        );
        assert_eq!(run(&f, "darnation"), (Outcome::Clean, "darnation".into()));
        assert_eq!(run(&f, "né ok"), (Outcome::Masked, "** ok".into()));
        assert_eq!(run(&f, "clean"), (Outcome::Clean, "clean".into()));
    }

    #[test]
    fn matches_any_script_in_any_case_and_masks_the_original_characters() {
        let (_d, f) = filter("привет\nΣΟΦΊΑ\nstraße\nİstanbul\n", FilterMode::Mask);
        assert_eq!(
            run(&f, "ПРИВЕТ, Привет и приветствие"),
            (Outcome::Masked, "******, ****** и приветствие".into())
        );
        assert_eq!(run(&f, "σοφία!"), (Outcome::Masked, "*****!".into()));
        assert_eq!(run(&f, "STRAßE"), (Outcome::Masked, "******".into()));
        // Full case folding: ß and ẞ are ss, whichever side has them.
        assert_eq!(run(&f, "strasse"), (Outcome::Masked, "*******".into()));
        assert_eq!(run(&f, "STRAẞE!"), (Outcome::Masked, "******!".into()));
        assert_eq!(
            run(&f, "σοφίας"),
            (Outcome::Clean, "σοφίας".into()),
            "a longer word"
        );
        assert_eq!(run(&f, "ΣΟΦΊΑ σοφίαs"), (Outcome::Masked, "***** σοφίαs".into()));
        // İ folds to two characters (i + a combining dot): the mask
        // still covers exactly the original word.
        assert_eq!(run(&f, "to İSTANBUL."), (Outcome::Masked, "to ********.".into()));
        // ASCII words still match in ASCII text, and inside non-ASCII text,
        // also spelled with characters that fold to ASCII (a ligature, the
        // long s, the Kelvin sign) and with a final sigma.
        let (_d, f) = filter("darn\nfilth\nsass\nkink\nδες\n", FilterMode::Mask);
        assert_eq!(run(&f, "DARN — ça"), (Outcome::Masked, "**** — ça".into()));
        assert_eq!(
            run(&f, "ﬁlth"),
            (Outcome::Masked, "****".into()),
            "one character for fi"
        );
        assert_eq!(run(&f, "ſaſs ok"), (Outcome::Masked, "**** ok".into()));
        assert_eq!(run(&f, "\u{212a}ink"), (Outcome::Masked, "****".into()));
        assert_eq!(run(&f, "ΔΕΣ"), (Outcome::Masked, "***".into()));
        // Bytes that are not UTF-8 are matched as ASCII, never panic.
        let mut body = b"darn \xff\xfe".to_vec();
        assert_eq!(FilterCache::default().apply(&f, &mut body), Outcome::Masked);
        assert_eq!(body, b"**** \xff\xfe".to_vec());
    }

    proptest::proptest! {
        /// The one-pass mapping agrees with the plain one: every byte of
        /// the case-folded text knows the character it came from.
        #[test]
        fn ranges_map_back_to_whole_original_characters(
            text in "[a-zA-Zß İΣσ\u{130}Ωω\u{212a}жЖ—é]{1,24}",
            picks in proptest::collection::vec((0usize..100, 1usize..8), 1..6),
        ) {
            let mut folded = String::new();
            fold_into(&text, &mut folded);
            let mut origin = Vec::new();
            for (at, c) in text.char_indices() {
                for part in fold(c) {
                    for _ in 0..part.len_utf8() {
                        origin.push((at, at + c.len_utf8()));
                    }
                }
            }
            proptest::prop_assert_eq!(origin.len(), folded.len());
            let ranges: Vec<(usize, usize)> = picks
                .iter()
                .map(|&(start, len)| {
                    let start = start % folded.len();
                    (start, (start + len).min(folded.len()))
                })
                .collect();
            let naive: Vec<(usize, usize)> = ranges
                .iter()
                .map(|&(start, end)| (origin[start].0, origin[end - 1].1))
                .collect();
            proptest::prop_assert_eq!(ranges_in_original(&text, ranges), naive);
        }
    }

    #[test]
    fn rejects_and_reloads() {
        let (dir, f) = filter("spam\n", FilterMode::Reject);
        let mut cache = FilterCache::default();
        let mut body = b"buy spam now".to_vec();
        assert_eq!(cache.apply(&f, &mut body), Outcome::Rejected);
        std::fs::write(dir.path().join("words.txt"), "eggs\n").unwrap();
        assert_eq!(f.reload().unwrap(), 1);
        let mut body = b"buy spam now".to_vec();
        assert_eq!(cache.apply(&f, &mut body), Outcome::Clean);
        let mut body = b"EGGS".to_vec();
        assert_eq!(cache.apply(&f, &mut body), Outcome::Rejected);
        // A failed reload keeps the list in service.
        std::fs::remove_file(dir.path().join("words.txt")).unwrap();
        assert!(f.reload().is_err());
        assert_eq!(cache.apply(&f, &mut b"eggs".to_vec()), Outcome::Rejected);
    }

    #[test]
    fn oversized_words_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        std::fs::write(&path, "a".repeat(MAX_WORD_BYTES + 1)).unwrap();
        assert!(ContentFilter::open(&path, FilterMode::Mask).is_err());
    }

    #[test]
    fn masking_matches_the_plain_definition_on_overlapping_ranges() {
        // The definition the linear `mask` must agree with: a byte is
        // masked when any range holds it.
        fn naive(body: &[u8], ranges: &[(usize, usize)]) -> Vec<u8> {
            let mut out = Vec::new();
            for (i, &b) in body.iter().enumerate() {
                if ranges.iter().any(|&(s, e)| (s..e).contains(&i)) {
                    if !(0x80..0xc0).contains(&b) {
                        out.push(b'*');
                    }
                } else {
                    out.push(b);
                }
            }
            out
        }
        let body = "héllo wörld, ab cd ef".as_bytes();
        let cases: [&[(usize, usize)]; 6] = [
            &[],
            &[(0, 6)],
            &[(0, 3), (2, 6), (1, 4)],
            &[(7, 13), (7, 13), (20, 22)],
            &[(0, body.len())],
            &[(3, 3), (5, 4), (19, 99)],
        ];
        for ranges in cases {
            assert_eq!(mask(body, ranges), naive(body, ranges), "{ranges:?}");
        }
    }

    #[test]
    fn a_body_made_of_listed_words_is_masked_whole() {
        // 5,461 matches in 16 KiB: the case that made masking quadratic.
        let (_d, f) = filter("ab\n", FilterMode::Mask);
        let text = "ab ".repeat(16 * 1024 / 3);
        let (outcome, masked) = run(&f, &text);
        assert_eq!(outcome, Outcome::Masked);
        assert_eq!(masked, "** ".repeat(16 * 1024 / 3));
    }
}
