//! NPD log patterns: compiling them with NPD's semantics and deciding which ones can only ever
//! match inside the newest line (so a whole rule set is checked with one scan per line).
//!
//! NPD (Go) compiles `pattern + "\z"` and runs it on the last `bufferSize` messages joined with
//! `"\n"`: a match must end at the end of the newest message, and the reported message is every
//! buffered line from the one where the match starts. A pattern that cannot match a newline
//! and does not anchor at the start of the text can only match inside the newest line; the
//! message is then that line. Everything else falls back to the exact buffer semantics.
//!
//! Go's `\d`, `\w`, `\s` and `\b` are ASCII-only; npd compiles patterns without Unicode classes
//! too (and falls back to Unicode mode only for patterns that need it, e.g. `\pL`).

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_syntax::hir::{Class, Hir, HirKind, Look};

/// The longest pattern accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 16 * 1024;
/// Limit on one compiled pattern (the regex crate's `size_limit`): a pathological pattern such as
/// `(a{1000}){1000}` is an error instead of a hang or a memory blow-up.
const SIZE_LIMIT: usize = 2 * 1024 * 1024;
/// Limit on the lazy DFA cache of one regex or set.
const DFA_SIZE_LIMIT: usize = 4 * 1024 * 1024;

/// A compiled NPD log pattern.
#[derive(Clone, Debug)]
pub struct LogPattern {
    /// The pattern as written in the rule file.
    pub source: String,
    /// What is compiled: the pattern anchored at the end of the text (NPD's `\z`).
    pub anchored: String,
    /// The compiled `anchored`.
    pub regex: Regex,
    /// True when a match can only lie inside the newest line.
    pub last_line_only: bool,
    /// Literals one of which every match contains (the pattern's prefixes once a leading
    /// optional part such as `.*` is set aside), or `None` when there is no such short list.
    /// A line that contains none of them cannot match: the engine checks all of them in one
    /// pass before it runs the patterns (see [`required_literals`]).
    pub required: Option<Vec<Vec<u8>>>,
}

/// Why a pattern was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Longer than [`MAX_PATTERN_LEN`].
    #[error("pattern is {len} bytes long; the limit is {MAX_PATTERN_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Not a valid regular expression, or too large once compiled.
    #[error("invalid regular expression: {0}")]
    Invalid(String),
    /// Uses the `x` (ignore whitespace) flag, which NPD's Go regexp rejects too.
    #[error("the x flag is not supported (NPD's Go regexp does not support it either)")]
    ExtendedFlag,
}

impl LogPattern {
    /// Compiles a pattern with NPD's semantics.
    pub fn compile(pattern: &str) -> Result<Self, PatternError> {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong { len: pattern.len() });
        }
        if uses_extended_flag(pattern) {
            return Err(PatternError::ExtendedFlag);
        }
        // The pattern must be valid on its own, so that wrapping it cannot change its meaning
        // (e.g. `a)|(b`).
        regex_syntax::ParserBuilder::new()
            .utf8(false)
            .build()
            .parse(pattern)
            .map_err(|e| PatternError::Invalid(syntax_error(&e)))?;
        let ascii = format!("(?-u:(?:{pattern}))\\z");
        let (anchored, regex) = match build(&ascii) {
            Ok(re) => (ascii, re),
            Err(_) => {
                let unicode = format!("(?:{pattern})\\z");
                let re =
                    build(&unicode).map_err(|e| PatternError::Invalid(one_line(&e.to_string())))?;
                (unicode, re)
            }
        };
        let hir = regex_syntax::ParserBuilder::new()
            .utf8(false)
            .unicode(!anchored.starts_with("(?-u:"))
            .build()
            .parse(pattern)
            .ok();
        let last_line_only = hir.as_ref().is_some_and(stays_on_one_line);
        let required = hir.as_ref().and_then(required_literals);
        Ok(Self {
            source: pattern.to_owned(),
            anchored,
            regex,
            last_line_only,
            required,
        })
    }
}

fn build(expr: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(expr)
        .size_limit(SIZE_LIMIT)
        .dfa_size_limit(DFA_SIZE_LIMIT)
        .build()
}

/// One regex set over many anchored patterns (all compiled already, so this cannot fail for
/// size reasons that a single pattern would not have shown, except for the sum).
pub fn build_set<'a>(
    anchored: impl IntoIterator<Item = &'a str>,
) -> Result<RegexSet, PatternError> {
    RegexSetBuilder::new(anchored)
        .size_limit(SIZE_LIMIT * 8)
        .dfa_size_limit(DFA_SIZE_LIMIT * 4)
        .build()
        .map_err(|e| PatternError::Invalid(one_line(&e.to_string())))
}

/// `unclosed group at byte 0` rather than the parser's multi-line diagram.
fn syntax_error(e: &regex_syntax::Error) -> String {
    match e {
        regex_syntax::Error::Parse(e) => format!("{} at byte {}", e.kind(), e.span().start.offset),
        regex_syntax::Error::Translate(e) => {
            format!("{} at byte {}", e.kind(), e.span().start.offset)
        }
        other => one_line(&other.to_string()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a group opens with flags that include `x`, e.g. `(?x)` or `(?ix:`.
fn uses_extended_flag(pattern: &str) -> bool {
    let b = pattern.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'(' if b.get(i + 1) == Some(&b'?') => {
                let flags = b[i + 2..].iter().take_while(|&&c| c != b':' && c != b')');
                if flags.clone().any(|&c| c == b'x') {
                    return true;
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    false
}

/// Literals one of which every match of `hir` contains, when there is a short list of them.
///
/// NPD's patterns are not anchored at the start, so a leading part that may match nothing
/// (`.*`, `\s*`, a word boundary) can be set aside: every match still contains a match of the
/// rest, whose prefixes are then required. `None` when the rest has no finite, non-empty set of
/// prefixes (e.g. `\w+ error`), or would need too many.
pub fn required_literals(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};

    let rest = match hir.kind() {
        HirKind::Concat(subs) => {
            let skip = subs.iter().take_while(|h| may_be_empty(h)).count();
            Hir::concat(subs[skip..].to_vec())
        }
        _ if may_be_empty(hir) => return None,
        _ => hir.clone(),
    };
    let mut extractor = Extractor::new();
    extractor.kind(ExtractKind::Prefix).limit_total(64);
    let seq = extractor.extract(&rest);
    let literals = seq.literals()?;
    if literals.is_empty() || literals.iter().any(|l| l.as_bytes().is_empty()) {
        return None;
    }
    Some(literals.iter().map(|l| l.as_bytes().to_vec()).collect())
}

/// Whether `hir` can match the empty string (so that it may be set aside at the start).
fn may_be_empty(hir: &Hir) -> bool {
    hir.properties().minimum_len() == Some(0)
}

/// True when no match of `hir` can contain a newline or depend on the start of the text.
fn stays_on_one_line(hir: &Hir) -> bool {
    match hir.kind() {
        HirKind::Empty => true,
        HirKind::Literal(lit) => !lit.0.contains(&b'\n'),
        HirKind::Class(Class::Unicode(c)) => !c
            .ranges()
            .iter()
            .any(|r| r.start() <= '\n' && '\n' <= r.end()),
        HirKind::Class(Class::Bytes(c)) => !c
            .ranges()
            .iter()
            .any(|r| r.start() <= b'\n' && b'\n' <= r.end()),
        HirKind::Look(look) => !matches!(
            look,
            Look::Start | Look::StartLF | Look::StartCRLF | Look::EndLF | Look::EndCRLF
        ),
        HirKind::Repetition(rep) => stays_on_one_line(&rep.sub),
        HirKind::Capture(cap) => stays_on_one_line(&cap.sub),
        HirKind::Concat(subs) | HirKind::Alternation(subs) => subs.iter().all(stays_on_one_line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_classification() {
        for (expr, want) in [
            (r"EXT4-fs error .*", true),
            (r"task [\S ]+:\w+ blocked for more than \w+ seconds\.", true),
            (r"alpha$", true),
            (r"\balpha\b", true),
            (r"[^x]+", false),
            (r"[^x\n]+", true),
            (r"(alpha|beta)+ gamma", true),
            (r"(?s)alpha.*beta", false),
            (r"^alpha", false),
            (r"\Aalpha", false),
            (r"(?m)^alpha$", false),
            ("alpha\nbeta", false),
            (r"alpha\nbeta", false),
            (r"alpha[\s\S]*beta", false),
            (r"alpha[\x00-\x7f]beta", false),
            (r"alpha(beta|\n)", false),
            (r"alpha{1,3}[\t-\r]beta", false),
            (r"alpha|beta", true),
            (r"a|", true),
            (r".*\[Hardware Error\]: event severity: fatal$", true),
            (r"\pL+ error", true),
        ] {
            let p = LogPattern::compile(expr).unwrap();
            assert_eq!(p.last_line_only, want, "{expr:?}");
        }
    }

    #[test]
    fn ascii_classes_like_go() {
        let p = LogPattern::compile(r"task \w+:\d+").unwrap();
        assert!(p.regex.is_match(b"task dd:12"));
        assert!(!p.regex.is_match("task d\u{e9}:12".as_bytes()));
        // A pattern that needs Unicode still compiles.
        let p = LogPattern::compile(r"\pL+:\d+").unwrap();
        assert!(p.regex.is_match("d\u{e9}:12".as_bytes()));
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(matches!(
            LogPattern::compile("a)|(b"),
            Err(PatternError::Invalid(_))
        ));
        assert!(matches!(
            LogPattern::compile("(unclosed"),
            Err(PatternError::Invalid(_))
        ));
        assert!(matches!(
            LogPattern::compile(r"(?x) a # comment"),
            Err(PatternError::ExtendedFlag)
        ));
        assert!(matches!(
            LogPattern::compile(&"a".repeat(MAX_PATTERN_LEN + 1)),
            Err(PatternError::TooLong { .. })
        ));
        assert!(matches!(
            LogPattern::compile(r"((a{100}){100}){100}"),
            Err(PatternError::Invalid(_))
        ));
        // An escaped parenthesis is not a flag group.
        assert!(LogPattern::compile(r"\(?x").is_ok());
    }

    #[test]
    fn required_literals_are_what_every_match_contains() {
        let required = |p: &str| {
            LogPattern::compile(p).unwrap().required.map(|ls| {
                ls.into_iter()
                    .map(|l| String::from_utf8(l).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            required(r"EXT4-fs error .*"),
            Some(vec!["EXT4-fs error ".into()])
        );
        // A leading `.*` is set aside.
        assert_eq!(
            required(r".*\[Hardware Error\]: event severity: fatal$"),
            Some(vec!["[Hardware Error]: event severity: fatal".into()])
        );
        assert_eq!(
            required(r"(alpha|beta) gamma"),
            Some(vec!["alpha gamma".into(), "beta gamma".into()])
        );
        // No short list: every line must be matched.
        assert_eq!(required(r"\w+ error"), None);
        assert_eq!(required(r".*"), None);
        assert_eq!(required(r"a|"), None);
        // Case-insensitive: every casing is listed, or none is required.
        let ci = required(r"(?i)oops").unwrap();
        assert!(ci.contains(&"OOPS".to_string()) && ci.contains(&"oops".to_string()));
        // Whatever is required really is in every matching line.
        for (pattern, line) in [
            (
                r"task [\S ]+:\w+ blocked for more than \w+ seconds\.",
                "INFO: task dd:12 blocked for more than 120 seconds.",
            ),
            (
                r".*\[Hardware Error\]: event severity: corrected$",
                "{1}[Hardware Error]: event severity: corrected",
            ),
            (
                r"\bXFS .* Shutting down filesystem.?",
                "XFS (loop0): Shutting down filesystem",
            ),
        ] {
            let p = LogPattern::compile(pattern).unwrap();
            assert!(p.regex.is_match(line.as_bytes()), "{pattern}");
            let required = p.required.expect(pattern);
            assert!(
                required
                    .iter()
                    .any(|l| line.as_bytes().windows(l.len()).any(|w| w == l)),
                "{pattern}: {required:?}"
            );
        }
    }

    #[test]
    fn anchored_at_the_end() {
        let p = LogPattern::compile(r"divide error: 0000 \[#\d+\] SMP").unwrap();
        assert!(p.regex.is_match(b"divide error: 0000 [#1] SMP"));
        assert!(!p.regex.is_match(b"divide error: 0000 [#1] SMP NOPTI"));
    }
}
