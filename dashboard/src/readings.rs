//! One device's readings over any range: the table's rows merged with the archive's blobs for
//! the days the range covers, so an answer never depends on whether or when the archiver ran.

use crate::problem::Problem;
use futures::{stream, StreamExt};
use infra::storage::{Container, Table};
use schemas::archive::layout::{floor_day, Layout, DAY_MS};
use schemas::archive::Format as ArchiveFormat;
use schemas::entity::StoredReading;
use schemas::timefmt;

/// Days read ahead for one request (each: a table query, then a blob).
const DAYS_AHEAD: usize = 4;

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
    ///
    /// Day by day, in order (a few read ahead), until the page is full: each day's table rows
    /// first, then its archive blob. The archiver writes a day's blob before it deletes the
    /// day's rows, so in this order no reading can fall between the two reads; and a page
    /// costs the days it covers, not the whole range.
    pub async fn readings(
        &self,
        device: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Page, Problem> {
        let days: Vec<i64> = (floor_day(from)..to).step_by(DAY_MS as usize).collect();
        let mut days = stream::iter(days)
            .map(|day| self.day(device, day.max(from), (day + DAY_MS).min(to), limit + 1))
            .buffered(DAYS_AHEAD);
        let mut readings: Vec<StoredReading> = Vec::new();
        while readings.len() <= limit {
            let Some(day) = days.next().await else { break };
            readings.extend(day?);
        }
        Ok(page(readings, limit))
    }

    /// One day's readings in `[from, to)` (at most `most` from the table), table rows winning
    /// over the archive's, in time order.
    async fn day(
        &self,
        device: &str,
        from: i64,
        to: i64,
        most: usize,
    ) -> Result<Vec<StoredReading>, Problem> {
        let filter = format!(
            "PartitionKey eq '{device}' and RowKey ge '{}' and RowKey lt '{}'",
            timefmt::format_ms(from),
            timefmt::format_ms(to)
        );
        let rows = self
            .table
            .query_first(&filter, most)
            .await
            .or_else(crate::api::none_if_missing)
            .map_err(|e| Problem::storage(&e))?;
        let table = rows
            .iter()
            .map(schemas::entity::from_entity)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Problem::internal(format!("a table row of {device}: {e}")))?;
        let mut archived = self.archived_day(device, floor_day(from)).await?;
        archived.retain(|r| (from..to).contains(&r.reading.measured_at_ms));
        // The table's row wins: it is the newer write.
        Ok(schemas::archive::merge(archived, table))
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
