//! Where a key path sits in a protocol's text, and which key path a text
//! position belongs to.
//!
//! serde gives line numbers only for the errors it finds itself, and
//! `serde_yaml_ng::Value` carries no spans. The semantic rules run on the
//! typed model, so to put a line on their errors this module scans the text
//! once and records, for every mapping entry and sequence item, its key path
//! (`measurements[3].soft`, keys spelled as in the file) and byte span.
//!
//! The scanner covers the YAML a protocol is written in: block mappings and
//! sequences (compact `- key: value` items included), flow collections
//! (`{ ... }`, `[ ... ]`, across lines), plain, quoted and block scalars,
//! comments, anchors and tags. JSON is YAML flow syntax, so JSON documents
//! go through the same scanner. It is a locator, not a validator: it runs on
//! text serde has already accepted, gives up quietly (keeping what it found)
//! on anything it does not understand, never panics and bounds its
//! recursion. Keys brought in through aliases or merge keys (`<<`) are not
//! located; callers fall back to the nearest enclosing path.

/// Deeper nesting than this stops the scan (serde_yaml_ng and serde_json
/// refuse deeper documents anyway).
const MAX_DEPTH: usize = 200;

/// A 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug)]
struct Entry {
    path: String,
    /// Byte offset of the key (mapping entry) or of the item (sequence).
    start: usize,
    /// Byte offset just past the value, as far as the scanner could tell.
    end: usize,
}

/// The key paths of one document and where they are.
pub(crate) struct SpanIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
    entries: Vec<Entry>,
}

impl<'a> SpanIndex<'a> {
    /// Scan `text` (YAML or JSON).
    pub(crate) fn new(text: &'a str) -> SpanIndex<'a> {
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        // A byte order mark is not content; the scanner starts after it.
        let skip = if text.starts_with('\u{feff}') { 3 } else { 0 };
        let mut scanner = Scanner {
            s: text.as_bytes().get(skip..).unwrap_or_default(),
            pos: 0,
            depth: 0,
            failed: false,
            entries: vec![Entry {
                path: String::new(),
                start: 0,
                end: text.len(),
            }],
        };
        scanner.document();
        let mut entries = scanner.entries;
        for e in entries.iter_mut().skip(1) {
            e.start += skip;
            e.end += skip;
        }
        SpanIndex {
            text,
            line_starts,
            entries,
        }
    }

    /// Where the key or item at `path` starts.
    pub(crate) fn find(&self, path: &str) -> Option<Position> {
        let e = self.entries.iter().find(|e| e.path == path)?;
        Some(self.position(e.start))
    }

    /// Where `path` starts, or else its nearest enclosing path that was
    /// located (never the document root, which says nothing). Returns the
    /// position and the path found.
    pub(crate) fn find_nearest<'p>(&self, path: &'p str) -> Option<(Position, &'p str)> {
        let mut p = path;
        while !p.is_empty() {
            if let Some(pos) = self.find(p) {
                return Some((pos, p));
            }
            p = parent(p);
        }
        None
    }

    /// The innermost key path whose span holds byte `offset` (`""` for the
    /// document itself).
    pub(crate) fn path_at(&self, offset: usize) -> &str {
        self.entries
            .iter()
            .filter(|e| e.start <= offset && offset <= e.end)
            .max_by_key(|e| (e.start, e.path.len()))
            .map_or("", |e| e.path.as_str())
    }

    /// The byte offset of a 1-based line and column, where the column counts
    /// bytes (as serde_json's do). Clamped to the text.
    pub(crate) fn offset_of(&self, line: usize, column: usize) -> usize {
        let start = line
            .checked_sub(1)
            .and_then(|l| self.line_starts.get(l))
            .copied()
            .unwrap_or(self.text.len());
        start
            .saturating_add(column.saturating_sub(1))
            .min(self.text.len())
    }

    /// The line and column of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> Position {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        Position { line, column }
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> ``.
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

fn child_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct Scanner<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
    /// Set when the scanner met something it does not understand; every
    /// loop stops and the entries found so far are kept.
    failed: bool,
    entries: Vec<Entry>,
}

fn blank(b: Option<u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t' | b'\r' | b'\n'))
}

fn flow_indicator(b: Option<u8>) -> bool {
    matches!(b, Some(b',' | b'[' | b']' | b'{' | b'}'))
}

impl Scanner<'_> {
    fn at(&self, i: usize) -> Option<u8> {
        self.s.get(i).copied()
    }

    fn peek(&self) -> Option<u8> {
        self.at(self.pos)
    }

    fn fail(&mut self) {
        self.failed = true;
        self.pos = self.s.len();
    }

    fn column(&self, pos: usize) -> usize {
        let upto = self.s.get(..pos).unwrap_or(self.s);
        match upto.iter().rposition(|&b| b == b'\n') {
            Some(nl) => pos - nl - 1,
            None => pos,
        }
    }

    fn skip_spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// After optional spaces: end of line, end of text or a comment.
    fn at_line_end(&self) -> bool {
        let mut p = self.pos;
        while matches!(self.at(p), Some(b' ' | b'\t' | b'\r')) {
            p += 1;
        }
        matches!(self.at(p), None | Some(b'\n' | b'#'))
    }

    /// Move to the start of the next line (or the end of the text).
    fn finish_line(&mut self) {
        match self
            .s
            .get(self.pos..)
            .and_then(|r| r.iter().position(|&b| b == b'\n'))
        {
            Some(i) => self.pos += i + 1,
            None => self.pos = self.s.len(),
        }
    }

    /// From the line starting at `from`, the first line with content (not
    /// blank, not only a comment): its content offset and indentation.
    fn next_content_line(&self, mut from: usize) -> Option<(usize, usize)> {
        loop {
            let line_start = from;
            let mut p = from;
            while matches!(self.at(p), Some(b' ' | b'\t' | b'\r')) {
                p += 1;
            }
            match self.at(p) {
                None => return None,
                Some(b'\n') => from = p + 1,
                Some(b'#') => {
                    let rest = self.s.get(p..)?;
                    from = p + rest.iter().position(|&b| b == b'\n')? + 1;
                }
                Some(_) => return Some((p, p - line_start)),
            }
        }
    }

    /// As [`Self::next_content_line`], also skipping lines indented deeper
    /// than `indent` (the tail of a multi-line or block scalar).
    fn next_line_at_most(&self, from: usize, indent: usize) -> Option<(usize, usize)> {
        let mut from = from;
        loop {
            let (p, ind) = self.next_content_line(from)?;
            if ind <= indent {
                return Some((p, ind));
            }
            let rest = self.s.get(p..)?;
            from = p + rest.iter().position(|&b| b == b'\n')? + 1;
        }
    }

    fn is_doc_marker(&self, p: usize) -> bool {
        self.column(p) == 0
            && (self.s.get(p..p + 3) == Some(b"---") || self.s.get(p..p + 3) == Some(b"..."))
            && blank(self.at(p + 3))
    }

    fn is_seq_dash(&self, p: usize) -> bool {
        self.at(p) == Some(b'-') && blank(self.at(p + 1))
    }

    fn document(&mut self) {
        loop {
            let Some((p, _)) = self.next_content_line(self.pos) else {
                return;
            };
            self.pos = p;
            if self.at(p) == Some(b'%') && self.column(p) == 0 {
                self.finish_line();
            } else if self.is_doc_marker(p) {
                self.pos += 3;
                self.skip_spaces();
                if self.at_line_end() {
                    self.finish_line();
                } else {
                    self.node("", None, false);
                    return;
                }
            } else {
                self.node("", None, false);
                return;
            }
        }
    }

    /// A node starting at `self.pos`. `parent_indent` is the indentation of
    /// the mapping or sequence holding it (`None` at the top); `inline` is
    /// set after `key: ` on the same line, where no block collection can
    /// start. Returns at the start of a line or the end of the text.
    fn node(&mut self, path: &str, parent_indent: Option<usize>, inline: bool) {
        if self.failed {
            return;
        }
        if self.depth >= MAX_DEPTH {
            return self.fail();
        }
        self.depth += 1;
        // Anchors and tags before the node.
        while matches!(self.peek(), Some(b'&' | b'!')) {
            while !blank(self.peek()) {
                self.pos += 1;
            }
            self.skip_spaces();
        }
        if self.at_line_end() {
            self.finish_line();
            self.block_value(path, parent_indent, false);
        } else {
            let col = self.column(self.pos);
            match self.peek() {
                Some(b'-') if !inline && self.is_seq_dash(self.pos) => self.block_seq(path, col),
                Some(b'[' | b'{') => {
                    self.flow_node(path);
                    self.finish_line();
                }
                // Block scalar: its lines are deeper and the caller skips them.
                Some(b'|' | b'>') => self.finish_line(),
                Some(_) if !inline && self.key_here().is_some() => self.block_map(path, col),
                Some(b'"' | b'\'') => {
                    match self.quoted(self.pos) {
                        Some((_, after)) => self.pos = after,
                        None => self.fail(),
                    }
                    self.finish_line();
                }
                _ => self.finish_line(),
            }
        }
        self.depth -= 1;
    }

    /// The value of a key or dash that ended its line: a node on the
    /// following lines indented deeper than `parent_indent`, or, for a
    /// mapping value, a sequence at the same indentation.
    fn block_value(&mut self, path: &str, parent_indent: Option<usize>, same_indent_seq: bool) {
        let Some((p, ind)) = self.next_content_line(self.pos) else {
            self.pos = self.s.len();
            return;
        };
        if self.is_doc_marker(p) {
            return;
        }
        let deeper = parent_indent.is_none_or(|pi| ind > pi);
        if deeper {
            self.pos = p;
            self.node(path, parent_indent, false);
        } else if same_indent_seq && Some(ind) == parent_indent && self.is_seq_dash(p) {
            self.pos = p;
            self.block_seq(path, ind);
        }
    }

    /// A plain or quoted key followed by `:` and a blank at `self.pos`, on
    /// this line: the key and the offset of the colon.
    fn key_here(&self) -> Option<(String, usize)> {
        let start = self.pos;
        match self.at(start)? {
            b'"' | b'\'' => {
                let (key, after) = self.quoted(start)?;
                let mut p = after;
                while matches!(self.at(p), Some(b' ' | b'\t')) {
                    p += 1;
                }
                (self.at(p) == Some(b':') && blank(self.at(p + 1))).then_some((key, p))
            }
            b'[' | b'{' | b'#' | b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`' | b'?' => {
                None
            }
            _ => {
                let mut p = start;
                loop {
                    match self.at(p) {
                        None | Some(b'\n') => return None,
                        Some(b':') if blank(self.at(p + 1)) => {
                            let key = String::from_utf8_lossy(self.s.get(start..p)?);
                            return Some((key.trim().to_string(), p));
                        }
                        Some(b'#') if p > start && matches!(self.at(p - 1), Some(b' ' | b'\t')) => {
                            return None
                        }
                        _ => p += 1,
                    }
                }
            }
        }
    }

    fn block_map(&mut self, path: &str, indent: usize) {
        loop {
            let before = self.pos;
            let Some((key, colon)) = self.key_here() else {
                return self.fail();
            };
            let child = child_key(path, &key);
            let idx = self.entries.len();
            self.entries.push(Entry {
                path: child.clone(),
                start: self.pos,
                end: colon + 1,
            });
            self.pos = colon + 1;
            self.skip_spaces();
            if self.at_line_end() {
                self.finish_line();
                self.block_value(&child, Some(indent), true);
            } else {
                self.node(&child, Some(indent), true);
            }
            if let Some(e) = self.entries.get_mut(idx) {
                e.end = self.pos;
            }
            if self.failed {
                return;
            }
            match self.next_line_at_most(self.pos, indent) {
                Some((p, ind))
                    if ind == indent && !self.is_doc_marker(p) && !self.is_seq_dash(p) =>
                {
                    self.pos = p;
                }
                _ => return,
            }
            if self.pos <= before {
                return self.fail();
            }
        }
    }

    fn block_seq(&mut self, path: &str, indent: usize) {
        let mut i = 0usize;
        loop {
            let before = self.pos;
            let child = format!("{path}[{i}]");
            let idx = self.entries.len();
            self.entries.push(Entry {
                path: child.clone(),
                start: self.pos,
                end: self.pos + 1,
            });
            self.pos += 1;
            self.skip_spaces();
            if self.at_line_end() {
                self.finish_line();
                self.block_value(&child, Some(indent), false);
            } else {
                self.node(&child, Some(indent), false);
            }
            if let Some(e) = self.entries.get_mut(idx) {
                e.end = self.pos;
            }
            if self.failed {
                return;
            }
            match self.next_line_at_most(self.pos, indent) {
                Some((p, ind)) if ind == indent && self.is_seq_dash(p) => self.pos = p,
                _ => return,
            }
            if self.pos <= before {
                return self.fail();
            }
            i += 1;
        }
    }

    /// A quoted scalar starting at `start` (on `'` or `"`): its unescaped
    /// text and the offset past the closing quote.
    fn quoted(&self, start: usize) -> Option<(String, usize)> {
        let q = self.at(start)?;
        let mut out = Vec::new();
        let mut p = start + 1;
        loop {
            let b = self.at(p)?;
            if b == q {
                if q == b'\'' && self.at(p + 1) == Some(b'\'') {
                    out.push(b'\'');
                    p += 2;
                    continue;
                }
                return Some((String::from_utf8_lossy(&out).into_owned(), p + 1));
            }
            if q == b'"' && b == b'\\' {
                let e = self.at(p + 1)?;
                p += 2;
                match e {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'0' => out.push(0),
                    b'u' => {
                        let hex = std::str::from_utf8(self.s.get(p..p + 4)?).ok()?;
                        let c = u32::from_str_radix(hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .unwrap_or(char::REPLACEMENT_CHARACTER);
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                        p += 4;
                    }
                    other => out.push(other),
                }
                continue;
            }
            out.push(b);
            p += 1;
        }
    }

    fn skip_flow_space(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r' | b'\n') => self.pos += 1,
                Some(b'#') => self.finish_line(),
                _ => return,
            }
        }
    }

    fn flow_node(&mut self, path: &str) {
        if self.failed {
            return;
        }
        if self.depth >= MAX_DEPTH {
            return self.fail();
        }
        self.depth += 1;
        while matches!(self.peek(), Some(b'&' | b'!')) {
            while !blank(self.peek()) && !flow_indicator(self.peek()) {
                self.pos += 1;
            }
            self.skip_flow_space();
        }
        match self.peek() {
            Some(b'{') => self.flow_map(path),
            Some(b'[') => self.flow_seq(path),
            Some(b'"' | b'\'') => match self.quoted(self.pos) {
                Some((_, after)) => self.pos = after,
                None => self.fail(),
            },
            _ => self.plain_in_flow(),
        }
        self.depth -= 1;
    }

    /// A plain scalar in a flow collection: up to `,`, `]`, `}`, a `:`
    /// before a blank or indicator, or a comment.
    fn plain_in_flow(&mut self) {
        let start = self.pos;
        loop {
            match self.peek() {
                None | Some(b',' | b']' | b'}') => return,
                Some(b':')
                    if blank(self.at(self.pos + 1)) || flow_indicator(self.at(self.pos + 1)) =>
                {
                    return
                }
                Some(b'#')
                    if self.pos > start
                        && matches!(self.at(self.pos - 1), Some(b' ' | b'\t' | b'\n')) =>
                {
                    return
                }
                _ => self.pos += 1,
            }
        }
    }

    /// A flow mapping key: quoted, or plain up to its `:`.
    fn flow_key(&mut self) -> Option<String> {
        match self.peek()? {
            b'"' | b'\'' => {
                let (key, after) = self.quoted(self.pos)?;
                self.pos = after;
                Some(key)
            }
            _ => {
                let start = self.pos;
                self.plain_in_flow();
                let key = String::from_utf8_lossy(self.s.get(start..self.pos)?);
                Some(key.trim().to_string())
            }
        }
    }

    fn flow_map(&mut self, path: &str) {
        self.pos += 1;
        loop {
            self.skip_flow_space();
            match self.peek() {
                None => return self.fail(),
                Some(b'}') => {
                    self.pos += 1;
                    return;
                }
                _ => {}
            }
            let start = self.pos;
            let Some(key) = self.flow_key() else {
                return self.fail();
            };
            let child = child_key(path, &key);
            let idx = self.entries.len();
            self.entries.push(Entry {
                path: child.clone(),
                start,
                end: self.pos,
            });
            self.skip_flow_space();
            if self.peek() == Some(b':') {
                self.pos += 1;
                self.skip_flow_space();
                if !matches!(self.peek(), Some(b',' | b'}')) {
                    self.flow_node(&child);
                }
            }
            if let Some(e) = self.entries.get_mut(idx) {
                e.end = self.pos;
            }
            self.skip_flow_space();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return;
                }
                _ => return self.fail(),
            }
        }
    }

    fn flow_seq(&mut self, path: &str) {
        self.pos += 1;
        let mut i = 0usize;
        loop {
            self.skip_flow_space();
            match self.peek() {
                None => return self.fail(),
                Some(b']') => {
                    self.pos += 1;
                    return;
                }
                _ => {}
            }
            let child = format!("{path}[{i}]");
            let idx = self.entries.len();
            self.entries.push(Entry {
                path: child.clone(),
                start: self.pos,
                end: self.pos,
            });
            self.flow_node(&child);
            self.skip_flow_space();
            // A single-pair mapping, `[key: value]`.
            if self.peek() == Some(b':') {
                self.pos += 1;
                self.skip_flow_space();
                if !matches!(self.peek(), Some(b',' | b']')) {
                    self.flow_node(&child);
                }
                self.skip_flow_space();
            }
            if let Some(e) = self.entries.get_mut(idx) {
                e.end = self.pos;
            }
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return;
                }
                _ => return self.fail(),
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-based line of the first line of `text` that contains `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    const REFERENCE: &str = include_str!("../../../reference-trial/protocol.yaml");

    #[test]
    fn finds_block_and_flow_entries_of_the_reference_protocol() {
        let ix = SpanIndex::new(REFERENCE);
        let line = |p: &str| ix.find(p).map(|p| p.line);
        assert_eq!(line("id"), Some(line_of(REFERENCE, "id: CARDIO-01")));
        assert_eq!(line("period.end"), Some(line_of(REFERENCE, "period: {")));
        assert_eq!(
            line("subject_identifier_system"),
            Some(line_of(REFERENCE, "subject_identifier_system:"))
        );
        assert_eq!(
            line("sites[2].timezone"),
            Some(line_of(REFERENCE, "site-003"))
        );
        assert_eq!(line("arms[1]"), Some(line_of(REFERENCE, "arms: [")));
        assert_eq!(
            line("visits[3].window.after"),
            Some(line_of(REFERENCE, "id: week-12"))
        );
        assert_eq!(
            line("measurements[3]"),
            Some(line_of(REFERENCE, "id: glucose"))
        );
        assert_eq!(
            line("measurements[3].soft"),
            Some(line_of(REFERENCE, "soft: [70, 250]"))
        );
        assert_eq!(
            line("measurements[3].convert[0].factor"),
            Some(line_of(REFERENCE, "factor: 18.016"))
        );
        assert_eq!(
            line("measurements[5].convert[0].unit"),
            Some(line_of(REFERENCE, "[lb_av]"))
        );
        assert_eq!(
            line("measurements[6].hard"),
            Some(line_of(REFERENCE, "id: steps"))
        );
        assert_eq!(line("measurements[7]"), None);
        assert_eq!(
            line("questionnaires[0].items[3].max_length"),
            Some(line_of(REFERENCE, "max_length: 500"))
        );
        assert_eq!(
            line("adverse_events.serious_report_hours"),
            Some(line_of(REFERENCE, "serious_report_hours"))
        );
    }

    /// Every key path of a value, with the last key (for mapping entries).
    fn paths(v: &serde_json::Value, path: &str, out: &mut Vec<(String, Option<String>)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    let p = child_key(path, k);
                    out.push((p.clone(), Some(k.clone())));
                    paths(child, &p, out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    out.push((p.clone(), None));
                    paths(child, &p, out);
                }
            }
            _ => {}
        }
    }

    /// Every key path of the reference protocol is found, on a line that
    /// holds its key, in the file itself and in other layouts of the same
    /// protocol (JSON pretty and compact, YAML in block style).
    #[test]
    fn every_key_path_is_found_in_every_layout() {
        let protocol = crate::parse_yaml(REFERENCE).unwrap();
        let value = serde_json::to_value(&protocol).unwrap();
        let mut all = Vec::new();
        paths(&value, "", &mut all);
        assert!(all.len() > 150, "{}", all.len());
        let layouts = [
            REFERENCE.to_string(),
            serde_json::to_string_pretty(&protocol).unwrap(),
            protocol.to_json(),
            serde_yaml_ng::to_string(&protocol).unwrap(),
            format!("\u{feff}---\n{REFERENCE}"),
        ];
        for text in &layouts {
            let ix = SpanIndex::new(text);
            for (path, key) in &all {
                let pos = ix
                    .find(path)
                    .unwrap_or_else(|| panic!("{path} not found in\n{text}"));
                let line = text.lines().nth(pos.line - 1).unwrap();
                if let Some(key) = key {
                    let rest: String = line.chars().skip(pos.column - 1).collect();
                    assert!(
                        rest.starts_with(key.as_str()) || rest.starts_with(&format!("\"{key}\"")),
                        "{path} at {pos:?}: {line}"
                    );
                }
                // The reference text is ASCII, so columns are bytes here.
                assert_eq!(ix.path_at(ix.offset_of(pos.line, pos.column)), path);
            }
        }
    }

    #[test]
    fn columns_point_at_the_key() {
        let ix = SpanIndex::new(REFERENCE);
        let pos = ix.find("measurements[0].soft").unwrap();
        let text = REFERENCE.lines().nth(pos.line - 1).unwrap();
        let col = text.find("soft:").unwrap() + 1;
        assert_eq!(pos.column, col);
    }

    #[test]
    fn handles_compact_sequences_quotes_comments_and_block_scalars() {
        let text = "\
# comment
a:
- x: 1
  'y z': \"q: #not\" # c
- [1, {k: v}]
b: |
  text: not a key
  - not an item
c: >-
    folded
d:
  - - inner
    - more
e: plain
  continued, still plain
f: &anchor !tag 3
";
        let ix = SpanIndex::new(text);
        let line = |p: &str| ix.find(p).map(|p| p.line);
        assert_eq!(line("a[0].x"), Some(3));
        assert_eq!(line("a[0].y z"), Some(4));
        assert_eq!(line("a[1][1].k"), Some(5));
        assert_eq!(line("b"), Some(6));
        assert_eq!(line("c"), Some(9));
        assert_eq!(line("d[0][1]"), Some(13));
        assert_eq!(line("e"), Some(14));
        assert_eq!(ix.find("f").map(|p| p.column), Some(1));
        assert_eq!(line("f"), Some(16));
    }

    #[test]
    fn json_paths_and_offsets() {
        let text = "{\n  \"a\": [1, {\"b\": \"x\"}],\n  \"c\": {\"d\": true}\n}\n";
        let ix = SpanIndex::new(text);
        assert_eq!(
            ix.find("a[1].b"),
            Some(Position {
                line: 2,
                column: 13
            })
        );
        assert_eq!(ix.find("c.d"), Some(Position { line: 3, column: 9 }));
        let off = text.find("true").unwrap();
        assert_eq!(ix.path_at(off), "c.d");
        assert_eq!(ix.path_at(text.find("\"x\"").unwrap()), "a[1].b");
        assert_eq!(ix.path_at(0), "");
        assert_eq!(ix.offset_of(3, 9), text.find("\"d\"").unwrap());
    }

    #[test]
    fn nearest_enclosing_path() {
        let ix = SpanIndex::new("a:\n  b: 1\n");
        assert_eq!(
            ix.find_nearest("a.x[3]").map(|(p, s)| (p.line, s)),
            Some((1, "a"))
        );
        assert_eq!(ix.find_nearest("zz"), None);
        assert_eq!(parent("a.b[2].c"), "a.b[2]");
        assert_eq!(parent("a.b[2]"), "a.b");
        assert_eq!(parent("a"), "");
    }

    #[test]
    fn never_panics_on_odd_text() {
        for t in [
            "",
            "\n",
            "-",
            "- ",
            ":",
            "a:",
            "{",
            "[",
            "'",
            "\"\\",
            "a: [",
            "a: {b",
            "- - - -",
            "\u{feff}a: 1",
            "a:\r\n  b: 1\r\n",
            "#",
            "---",
            "--- a",
            "...",
            "%YAML 1.2\n---\na: 1",
            "? x\n: y",
            "a: 'unterminated",
            "a: \"\\u12\"",
            "[a: b, c]",
            "{a: b c: d}",
        ] {
            let ix = SpanIndex::new(t);
            let _ = ix.find("a");
            let _ = ix.path_at(t.len());
            let _ = ix.position(t.len() + 5);
            let _ = ix.offset_of(0, 0);
            let _ = ix.offset_of(99, 99);
        }
        let deep = "[".repeat(10_000);
        let _ = SpanIndex::new(&deep);
        let deep = "a:\n".to_string() + &" - ".repeat(5_000);
        let _ = SpanIndex::new(&deep);
    }
}
