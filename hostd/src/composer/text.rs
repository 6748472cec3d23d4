//! Text preparation for the composer: normalisation (case, punctuation, number words) and
//! a working copy whose consumed spans are blanked so later rules never read a phrase twice.

use std::ops::Range;

/// Lowercases, turns punctuation into spaces (keeping the characters that matter inside
/// host names, versions and sizes), and rewrites number words as digits.
pub fn normalise(input: &str) -> String {
    let lower = input.to_lowercase().replace(['’', '‘', '`'], "'");
    let mut spaced = String::with_capacity(lower.len() + 8);
    let chars: Vec<char> = lower.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let next = chars.get(i + 1).copied();
        let prev = if i > 0 {
            chars.get(i - 1).copied()
        } else {
            None
        };
        match c {
            ',' | ';' | '&' | '+' => {
                spaced.push_str(if c == '&' || c == '+' { " and " } else { " , " });
            }
            // A dot is kept only between two alphanumerics ("node.js", "24.04", "github.com").
            '.' => {
                if prev.is_some_and(|p| p.is_alphanumeric() || p == '*')
                    && next.is_some_and(|n| n.is_alphanumeric())
                {
                    spaced.push('.');
                } else {
                    spaced.push(' ');
                }
            }
            '*' if next == Some('.') => spaced.push('*'),
            '-' | '\'' | '×' => spaced.push(c),
            c if c.is_alphanumeric() => spaced.push(c),
            _ => spaced.push(' '),
        }
    }
    let words: Vec<&str> = spaced.split_whitespace().collect();
    rewrite_numbers(&words).join(" ")
}

fn small_number(w: &str) -> Option<u32> {
    const UNITS: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    UNITS.iter().position(|u| *u == w).map(|p| p as u32)
}

fn tens(w: &str) -> Option<u32> {
    match w {
        "twenty" => Some(20),
        "thirty" => Some(30),
        "forty" => Some(40),
        "fifty" => Some(50),
        "sixty" => Some(60),
        "seventy" => Some(70),
        "eighty" => Some(80),
        "ninety" => Some(90),
        _ => None,
    }
}

/// Words after which a lone "a"/"an" means one ("an hour", "a gig").
fn is_unit_word(w: &str) -> bool {
    matches!(
        w,
        "hour"
            | "day"
            | "week"
            | "minute"
            | "gig"
            | "gigabyte"
            | "terabyte"
            | "core"
            | "cpu"
            | "vcpu"
            | "month"
            | "half"
    )
}

fn rewrite_numbers(words: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let next = words.get(i + 1).copied().unwrap_or("");
        let next2 = words.get(i + 2).copied().unwrap_or("");
        // "half a gig", "half an hour" -> "0.5 gig"
        if w == "half" && (next == "a" || next == "an") && !next2.is_empty() {
            out.push("0.5".into());
            i += 2;
            continue;
        }
        // "a couple of cores", "couple of hours"
        if (w == "a" && next == "couple") || w == "couple" {
            out.push("2".into());
            i += if w == "a" { 2 } else { 1 };
            if words.get(i) == Some(&"of") {
                i += 1;
            }
            continue;
        }
        // "an hour and a half" -> "1.5 hour"
        if (w == "a" || w == "an" || w == "one")
            && is_unit_word(next)
            && next2 == "and"
            && words.get(i + 3) == Some(&"a")
            && words.get(i + 4) == Some(&"half")
        {
            out.push("1.5".into());
            out.push(next.into());
            i += 5;
            continue;
        }
        // "for the week" -> "for 1 week"
        if w == "for" && next == "the" && matches!(next2, "day" | "week" | "hour" | "night") {
            out.push("for".into());
            let (n, unit) = if next2 == "night" {
                ("12", "hour")
            } else {
                ("1", next2)
            };
            out.push(n.into());
            out.push(unit.into());
            i += 3;
            continue;
        }
        if (w == "a" || w == "an") && is_unit_word(next) {
            out.push("1".into());
            i += 1;
            continue;
        }
        if let Some(t) = tens(w) {
            // "twenty four" / "twenty-four"
            if let Some(u) = small_number(next).filter(|u| (1..10).contains(u)) {
                out.push((t + u).to_string());
                i += 2;
                continue;
            }
            out.push(t.to_string());
            i += 1;
            continue;
        }
        if let Some((a, b)) = w.split_once('-') {
            if let (Some(t), Some(u)) = (tens(a), small_number(b)) {
                out.push((t + u).to_string());
                i += 1;
                continue;
            }
            // "two-core", "four-hour"
            if let Some(n) = small_number(a) {
                out.push(format!("{n}-{b}"));
                i += 1;
                continue;
            }
        }
        if let Some(n) = small_number(w) {
            out.push(n.to_string());
        } else if w == "hundred" {
            // "two hundred" -> multiply the previous number.
            if let Some(prev) = out
                .last_mut()
                .and_then(|p| p.parse::<u32>().ok().map(|v| (p, v)))
            {
                *prev.0 = (prev.1 * 100).to_string();
            } else {
                out.push("100".into());
            }
        } else if w == "dozen" {
            out.push("12".into());
        } else {
            out.push(w.into());
        }
        i += 1;
    }
    out
}

/// The normalised text plus a copy in which consumed spans are blanked out.
#[derive(Debug, Clone)]
pub struct Work {
    pub text: String,
    pub remaining: String,
}

impl Work {
    pub fn new(input: &str) -> Work {
        let text = normalise(input);
        Work {
            remaining: text.clone(),
            text,
        }
    }

    /// Blanks `range` of the remaining text so no later rule sees it.
    pub fn consume(&mut self, range: Range<usize>) {
        // Ranges always come from regex matches or word spans of `remaining`, so they lie on
        // char boundaries; replacing with ASCII spaces of the same byte length keeps every
        // other offset valid.
        let blank = " ".repeat(range.len());
        self.remaining.replace_range(range, &blank);
    }

    /// Consumes every match of `re` in the remaining text; their ranges.
    pub fn consume_all(&mut self, re: &regex::Regex) -> Vec<Range<usize>> {
        let found: Vec<Range<usize>> = re.find_iter(&self.remaining).map(|m| m.range()).collect();
        for r in &found {
            self.consume(r.clone());
        }
        found
    }

    /// The words still unconsumed, with their byte ranges.
    pub fn words(&self) -> Vec<(Range<usize>, &str)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in self.remaining.char_indices() {
            match (c == ' ', start) {
                (true, Some(s)) => {
                    out.push((s..i, &self.remaining[s..i]));
                    start = None;
                }
                (false, None) => start = Some(i),
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s..self.remaining.len(), &self.remaining[s..]));
        }
        out
    }

    /// [`Work::words`] as owned strings, for rules that consume words while they walk them.
    pub fn owned_words(&self) -> Vec<(Range<usize>, String)> {
        self.words()
            .into_iter()
            .map(|(r, w)| (r, w.to_string()))
            .collect()
    }

    /// Up to `n` words of the full text after byte `pos`.
    pub fn words_after(&self, pos: usize, n: usize) -> Vec<&str> {
        self.text[pos.min(self.text.len())..]
            .split_whitespace()
            .take(n)
            .collect()
    }

    /// Like [`Work::words_after`], stopping at a comma.
    pub fn clause_after(&self, pos: usize, n: usize) -> Vec<&str> {
        self.words_after(pos, n)
            .into_iter()
            .take_while(|w| *w != ",")
            .collect()
    }

    /// Like [`Work::words_before`], stopping at a comma.
    pub fn clause_before(&self, pos: usize, n: usize) -> Vec<&str> {
        self.words_before(pos, n)
            .into_iter()
            .take_while(|w| *w != ",")
            .collect()
    }

    /// Up to `n` words of the full text before byte `pos`, nearest first.
    pub fn words_before(&self, pos: usize, n: usize) -> Vec<&str> {
        self.text[..pos.min(self.text.len())]
            .split_whitespace()
            .rev()
            .take(n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_words_become_digits() {
        assert_eq!(normalise("Two cores and Four gigs"), "2 cores and 4 gigs");
        assert_eq!(normalise("twenty-four hours"), "24 hours");
        assert_eq!(normalise("thirty two GB"), "32 gb");
        assert_eq!(normalise("half a gig of RAM"), "0.5 gig of ram");
        assert_eq!(normalise("for an hour"), "for 1 hour");
        assert_eq!(normalise("a couple of cores"), "2 cores");
        assert_eq!(normalise("an hour and a half"), "1.5 hour");
        assert_eq!(normalise("a 50 GB disk"), "a 50 gb disk");
    }

    #[test]
    fn punctuation_keeps_hosts_and_versions() {
        assert_eq!(
            normalise("only github.com, pypi.org."),
            "only github.com , pypi.org"
        );
        assert_eq!(normalise("Ubuntu 24.04!"), "ubuntu 24.04");
        assert_eq!(normalise("node.js + git"), "node.js and git");
        assert_eq!(normalise("and *.docker.io"), "and *.docker.io");
    }

    #[test]
    fn consume_blanks_and_words_skip_blanks() {
        let mut w = Work::new("firefox with 4 gb");
        w.consume(13..17);
        let words: Vec<&str> = w.words().into_iter().map(|(_, s)| s).collect();
        assert_eq!(words, ["firefox", "with"]);
    }
}
