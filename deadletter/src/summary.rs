//! What `list` prints: counts by reason, device and day, and record rows. Pure.

use schemas::{DeadLetter, Reason};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// Devices shown in the table; the JSON has them all.
const TOP_DEVICES: usize = 20;
/// Characters of `detail` shown in a row.
const DETAIL_CHARS: usize = 70;

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    pub count: usize,
    pub oldest: String,
    pub newest: String,
}

impl Group {
    fn add(&mut self, received_at: &str) {
        self.count += 1;
        if self.oldest.is_empty() || received_at < self.oldest.as_str() {
            self.oldest = received_at.to_owned();
        }
        if received_at > self.newest.as_str() {
            self.newest = received_at.to_owned();
        }
    }
}

/// Counts of the records a walk matched. Times are `received_at` (RFC 3339 in one fixed form,
/// so they order as strings).
#[derive(Debug, Default)]
pub struct Summary {
    pub records: usize,
    /// Records that repeat another's identity (the processor redid work that had already
    /// dead-lettered them); left out of every other count.
    pub duplicates: usize,
    seen: std::collections::HashSet<u64>,
    pub by_reason: BTreeMap<Reason, Group>,
    pub by_device: HashMap<String, Group>,
    pub by_day: BTreeMap<String, usize>,
}

impl Summary {
    pub fn add(&mut self, record: &DeadLetter) {
        if !self.seen.insert(record.identity()) {
            self.duplicates += 1;
            return;
        }
        let at = record.received_at.as_str();
        self.records += 1;
        self.by_reason.entry(record.reason).or_default().add(at);
        let device = record.device_id.as_deref().unwrap_or("(none)");
        self.by_device.entry(device.to_owned()).or_default().add(at);
        *self
            .by_day
            .entry(at.get(..10).unwrap_or(at).to_owned())
            .or_default() += 1;
    }

    /// Devices by count, then id.
    fn devices(&self) -> Vec<(&String, &Group)> {
        let mut devices: Vec<_> = self.by_device.iter().collect();
        devices.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        devices
    }

    pub fn to_json(&self) -> serde_json::Value {
        let groups = |rows: Vec<(String, &Group)>, key: &str| -> Vec<serde_json::Value> {
            rows.into_iter()
                .map(|(name, g)| {
                    serde_json::json!({key: name, "count": g.count, "oldest": g.oldest, "newest": g.newest})
                })
                .collect()
        };
        let reasons = self
            .by_reason
            .iter()
            .map(|(r, g)| (r.as_str().to_owned(), g))
            .collect();
        let devices = self
            .devices()
            .into_iter()
            .map(|(d, g)| (d.clone(), g))
            .collect();
        let days: Vec<serde_json::Value> = self
            .by_day
            .iter()
            .map(|(day, n)| serde_json::json!({"day": day, "count": n}))
            .collect();
        serde_json::json!({
            "records": self.records,
            "duplicates": self.duplicates,
            "by_reason": groups(reasons, "reason"),
            "by_device": groups(devices, "device"),
            "by_day": days,
        })
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut table = Table::new(["REASON", "COUNT", "OLDEST", "NEWEST"]);
        let mut reasons: Vec<_> = self.by_reason.iter().collect();
        reasons.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        for (reason, g) in reasons {
            table.row([
                reason.as_str().to_owned(),
                count(g.count),
                g.oldest.clone(),
                g.newest.clone(),
            ]);
        }
        out.push_str(&table.render());
        out.push('\n');
        let devices = self.devices();
        let title = if devices.len() > TOP_DEVICES {
            format!("DEVICE (top {TOP_DEVICES} of {})", count(devices.len()))
        } else {
            "DEVICE".to_owned()
        };
        let mut table = Table::new([title.as_str(), "COUNT", "OLDEST", "NEWEST"]);
        for (device, g) in devices.into_iter().take(TOP_DEVICES) {
            table.row([
                device.clone(),
                count(g.count),
                g.oldest.clone(),
                g.newest.clone(),
            ]);
        }
        out.push_str(&table.render());
        out.push('\n');
        let mut table = Table::new(["DAY (received)", "COUNT"]);
        for (day, n) in &self.by_day {
            table.row([day.clone(), count(*n)]);
        }
        out.push_str(&table.render());
        out
    }
}

/// A record's row in `list --limit`.
pub fn rows_table(rows: &[(String, DeadLetter)]) -> String {
    let mut table = Table::new(["ID", "RECEIVED", "REASON", "DEVICE", "REPLAYS", "DETAIL"]);
    for (id, r) in rows {
        let detail: String = r.detail.chars().take(DETAIL_CHARS).collect();
        let detail = if detail.len() < r.detail.len() {
            format!("{detail}...")
        } else {
            detail
        };
        table.row([
            id.clone(),
            r.received_at.clone(),
            r.reason.as_str().to_owned(),
            r.device_id.clone().unwrap_or_else(|| "(none)".into()),
            r.replay_count.to_string(),
            detail,
        ]);
    }
    table.render()
}

/// `text` with every control character (and every Unicode direction override) escaped, so
/// device-controlled text (topic, payload, detail) cannot move the cursor, recolour or
/// rewrite the operator's terminal, or reorder what it shows. Line breaks are kept only when
/// `keep_newlines` (a payload printed whole); in a table cell they are escaped too.
pub fn terminal_safe(text: &str, keep_newlines: bool) -> String {
    let risky = |c: char| {
        (c.is_control() && !(keep_newlines && matches!(c, '\n' | '\t')))
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(risky) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if risky(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `12,345`.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A plain text table: columns padded to their widest cell, the last one left ragged.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new<const N: usize>(header: [&str; N]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row; cells may be device-controlled, so they are made terminal-safe here.
    fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.rows
            .push(cells.iter().map(|c| terminal_safe(c, false)).collect());
    }

    fn render(&self) -> String {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == columns {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::dead_letter::Refusal;
    use schemas::DeviceMessage;

    fn record(reason: Reason, device: &str, at: &str) -> DeadLetter {
        let ms = schemas::timefmt::parse_rfc3339_ms(at).unwrap();
        let msg = DeviceMessage::from_mqtt("t", b"{}", ms);
        DeadLetter::new(
            &msg,
            Refusal {
                reason,
                detail: "d".repeat(100),
                device_id: Some(device.into()),
                rejected_indexes: Vec::new(),
                attempts: 1,
                dead_lettered_at_ms: ms,
            },
        )
    }

    #[test]
    fn groups_by_reason_device_and_day() {
        let mut s = Summary::default();
        s.add(&record(Reason::Stale, "a", "2026-11-20T10:00:00Z"));
        s.add(&record(Reason::Stale, "b", "2026-11-19T10:00:00Z"));
        s.add(&record(Reason::Schema, "a", "2026-11-21T10:00:00Z"));
        assert_eq!(s.records, 3);
        let stale = &s.by_reason[&Reason::Stale];
        assert_eq!(stale.count, 2);
        assert_eq!(stale.oldest, "2026-11-19T10:00:00.000Z");
        assert_eq!(stale.newest, "2026-11-20T10:00:00.000Z");
        assert_eq!(s.by_device["a"].count, 2);
        assert_eq!(s.by_day.len(), 3);
        let json = s.to_json();
        assert_eq!(json["by_device"][0]["device"], "a");
        assert_eq!(json["by_reason"][0]["reason"], "schema");
        let table = s.to_table();
        assert!(
            table.contains("stale   2      2026-11-19T10:00:00.000Z"),
            "{table}"
        );
        let rows = rows_table(&[(
            "abc".into(),
            record(Reason::Stale, "a", "2026-11-20T10:00:00Z"),
        )]);
        assert!(rows.lines().nth(1).unwrap().ends_with("d..."), "{rows}");
    }

    #[test]
    fn counts_have_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn device_text_cannot_drive_the_terminal() {
        let hostile = "ok\u{1b}[2J\u{1b}]0;pwned\u{7}\rline\nnext\u{202e}txt";
        let cell = terminal_safe(hostile, false);
        assert!(
            !cell.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{cell}"
        );
        assert!(cell.starts_with("ok\\u{1b}[2J"), "{cell}");
        let whole = terminal_safe(hostile, true);
        assert!(
            whole.contains("line\nnext") && !whole.contains('\u{1b}'),
            "{whole}"
        );
        assert_eq!(terminal_safe("plain text", false), "plain text");
    }
}
