//! Cutting text to a limit in bytes without splitting a character: error
//! messages quote what they reject, and what they reject may be a
//! megabyte of anything.

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `text` in at most `max` bytes, ending with `…` if anything was cut.
pub fn capped(text: String, max: usize) -> String {
    const MARK: &str = "…";
    if text.len() <= max {
        return text;
    }
    let mut out = cut(&text, max.saturating_sub(MARK.len())).to_owned();
    out.push_str(MARK);
    out
}

/// `text` on one line, for a table a terminal shows: control characters
/// (a line break of a program's error output, a terminal escape sequence
/// a submitter put in a label) written as escapes (`\n`, `\u{1b}`), the
/// rest as it is.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_writes_control_characters_as_escapes() {
        assert_eq!(one_line("plain ü"), "plain ü");
        assert_eq!(
            one_line("line\nnext\t\u{1b}[31mred"),
            "line\\nnext\\t\\u{1b}[31mred"
        );
    }

    #[test]
    fn text_is_cut_at_a_character_boundary_and_marked() {
        assert_eq!(cut("ab€cd", 3), "ab");
        assert_eq!(cut("ab", 8), "ab");
        assert_eq!(capped("short".into(), 8), "short");
        assert_eq!(capped("ab€cd".into(), 6), "ab…");
        assert_eq!(capped("abcdefgh".into(), 7), "abcd…");
    }
}
