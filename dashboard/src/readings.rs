//! One device's readings over any range: the table's rows merged with the archive's blobs for
//! the days the range covers, so an answer never depends on whether or when the archiver ran.

use crate::problem::Problem;
use futures::{stream, StreamExt};
use infra::storage::{Container, Table};
use schemas::archive::layout::{floor_day, Layout, DAY_MS};
use schemas::archive::Format as ArchiveFormat;
use schemas::entity::StoredReading;
use schemas::timefmt;
use std::collections::BTreeMap;

/// Archive blobs read at once for one request.
const BLOB_READS: usize = 8;

#[derive(Debug)]
pub struct Sources {
    pub table: Table,
    pub archive: Container,
    pub layout: Layout,
    pub format: ArchiveFormat,
}

/// A page of readings, and where the next page starts (if there is more).
#[derive(Debug)]
pub struct Page {
    pub readings: Vec<StoredReading>,
    pub next_from: Option<i64>,
}

impl Sources {
    /// `device`'s readings in `[from, to)`, oldest first, at most `limit`.
    pub async fn readings(
        &self,
        device: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Page, Problem> {
        let filter = format!(
            "PartitionKey eq '{device}' and RowKey ge '{}' and RowKey lt '{}'",
            timefmt::format_ms(from),
            timefmt::format_ms(to)
        );
        // The table first, then the archive: the archiver writes a day's blob before it
        // deletes the day's rows, so in this order no reading can fall between the two reads.
        // The table's first `limit + 1` are enough: whatever the archive adds, the merged
        // first `limit + 1` come from them and the archive's rows.
        let rows = self
            .table
            .query_first(&filter, limit + 1)
            .await
            .or_else(crate::api::none_if_missing)
            .map_err(|e| Problem::storage(&e))?;
        let table = rows
            .iter()
            .map(schemas::entity::from_entity)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Problem::internal(format!("a table row of {device}: {e}")))?;
        let mut merged: BTreeMap<i64, StoredReading> = table
            .into_iter()
            .map(|row| (row.reading.measured_at_ms, row))
            .collect();
        // Archive days in order, a few read ahead, until the first `limit + 1` readings are
        // known: memory stays near `limit` readings and a day's blob, whatever the range.
        let days: Vec<i64> = (floor_day(from)..to).step_by(DAY_MS as usize).collect();
        let mut blobs = stream::iter(days.iter().copied())
            .map(|day| async move { (day, self.archived_day(device, day).await) })
            .buffered(BLOB_READS);
        while let Some((day, archived)) = blobs.next().await {
            if merged.len() > limit && merged.keys().nth(limit).is_some_and(|t| *t < day) {
                break;
            }
            for row in archived? {
                let at = row.reading.measured_at_ms;
                if (from..to).contains(&at) {
                    // The table's row wins: it is the newer write.
                    merged.entry(at).or_insert(row);
                }
            }
        }
        drop(blobs);
        Ok(page(merged.into_values().collect(), limit))
    }

    async fn archived_day(&self, device: &str, day: i64) -> Result<Vec<StoredReading>, Problem> {
        let name = self.layout.blob_name(device, day, self.format.extension());
        let blob = self
            .archive
            .get(&name)
            .await
            .or_else(|e| if e.is_not_found() { Ok(None) } else { Err(e) })
            .map_err(|e| Problem::storage(&e))?;
        match blob {
            None => Ok(Vec::new()),
            Some(content) => schemas::archive::decode(self.format, content.bytes)
                .map_err(|e| Problem::internal(format!("archive blob {name}: {e}"))),
        }
    }
}

fn page(mut readings: Vec<StoredReading>, limit: usize) -> Page {
    let next_from = (readings.len() > limit).then(|| {
        readings.truncate(limit);
        readings.last().map_or(0, |r| r.reading.measured_at_ms + 1)
    });
    Page {
        readings,
        next_from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::reading::Reading;

    fn row(at: i64, temperature: f64) -> StoredReading {
        StoredReading {
            reading: Reading {
                device_id: "d".into(),
                measured_at_ms: at,
                seq: None,
                temperature: Some(temperature),
                humidity: None,
                pressure: None,
                extras: Vec::new(),
            },
            ingested_at_ms: at,
        }
    }

    fn times(rows: &[StoredReading]) -> Vec<i64> {
        rows.iter().map(|r| r.reading.measured_at_ms).collect()
    }

    #[test]
    fn a_page_continues_after_its_last_reading() {
        let rows = vec![row(1, 0.0), row(2, 0.0), row(3, 0.0)];
        let p = page(rows.clone(), 2);
        assert_eq!((times(&p.readings), p.next_from), (vec![1, 2], Some(3)));
        let p = page(rows, 3);
        assert_eq!((p.readings.len(), p.next_from), (3, None));
    }
}
