//! Line (segment) iteration shared by the splitter and the parser: `\r`,
//! `\n` and `\r\n` each end one line, mixed freely.

/// One line: `start..end` (without its terminator) and its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line {
    pub start: usize,
    pub end: usize,
    /// From `first_line` (usually 1).
    pub number: usize,
}

/// Iterator over the lines of `bytes[start..]`.
pub(crate) struct Lines<'a> {
    bytes: &'a [u8],
    pos: usize,
    number: usize,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(bytes: &'a [u8], start: usize, first_line: usize) -> Lines<'a> {
        Lines {
            bytes,
            pos: start,
            number: first_line,
        }
    }
}

impl Iterator for Lines<'_> {
    type Item = Line;

    fn next(&mut self) -> Option<Line> {
        let rest = self.bytes.get(self.pos..).filter(|r| !r.is_empty())?;
        let start = self.pos;
        let number = self.number;
        match rest.iter().position(|b| *b == b'\r' || *b == b'\n') {
            Some(k) => {
                let end = start + k;
                let crlf = rest.get(k) == Some(&b'\r') && rest.get(k + 1) == Some(&b'\n');
                self.pos = end + if crlf { 2 } else { 1 };
                self.number += 1;
                Some(Line { start, end, number })
            }
            None => {
                self.pos = self.bytes.len();
                Some(Line {
                    start,
                    end: self.bytes.len(),
                    number,
                })
            }
        }
    }
}

/// A line with nothing but spaces and tabs (or nothing).
pub(crate) fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| *b == b' ' || *b == b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_terminators() {
        let b = b"a\rb\nc\r\nd\n\re";
        let got: Vec<_> = Lines::new(b, 0, 1)
            .map(|l| (&b[l.start..l.end], l.number))
            .collect();
        assert_eq!(
            got,
            vec![
                (&b"a"[..], 1),
                (b"b", 2),
                (b"c", 3),
                (b"d", 4),
                (b"", 5),
                (b"e", 6)
            ]
        );
    }
}
