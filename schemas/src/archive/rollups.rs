//! Rollups as a Parquet file, for the query API's `format=parquet`: one row per period, the
//! archive's conventions (snake_case columns, UTC microsecond timestamps, ZSTD), per
//! measurement its count, min, max, mean and sum (null when the period has none of it), and
//! the completeness ledger (null when no reading of the period has a `seq`, or it is not known).

use super::{ArchiveError, UTC, ZSTD_LEVEL};
use crate::rollup::{Rollup, Seqs, Stats, MEASUREMENTS};
use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::sync::Arc;

/// The five columns of each measurement, as suffixes of its lower-case name.
const PARTS: [&str; 5] = ["count", "min", "max", "mean", "sum"];

/// The rollups' Arrow schema: `device_id`, `period_start`, `count`, `first_at`, `last_at`,
/// then `temperature_count` .. `pressure_sum`, then `seq_first`, `seq_last`, `seq_distinct`,
/// `seq_missing`.
pub fn arrow_schema() -> SchemaRef {
    let utc_micros = || DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()));
    let mut fields = vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("period_start", utc_micros(), false),
        Field::new("count", DataType::UInt64, false),
        Field::new("first_at", utc_micros(), false),
        Field::new("last_at", utc_micros(), false),
    ];
    for m in MEASUREMENTS {
        let m = m.to_lowercase();
        for part in PARTS {
            let data_type = if part == "count" {
                DataType::UInt64
            } else {
                DataType::Float64
            };
            fields.push(Field::new(
                format!("{m}_{part}"),
                data_type,
                part != "count",
            ));
        }
    }
    fields.extend([
        Field::new("seq_first", DataType::Int64, true),
        Field::new("seq_last", DataType::Int64, true),
        Field::new("seq_distinct", DataType::UInt64, true),
        Field::new("seq_missing", DataType::UInt64, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// Encodes `rollups` (any number, none included: an empty file still carries the schema).
pub fn encode(rollups: &[Rollup]) -> Result<Bytes, ArchiveError> {
    let micros = |ms: i64| ms * 1000;
    let times = |at: fn(&Rollup) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rollups.iter().map(|r| micros(at(r))))
                .with_timezone(UTC),
        )
    };
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rollups.iter().map(|r| r.device_id.as_str()),
        )),
        times(|r| r.start_ms),
        Arc::new(UInt64Array::from_iter_values(
            rollups.iter().map(|r| r.count),
        )),
        times(|r| r.first_at_ms),
        times(|r| r.last_at_ms),
    ];
    for i in 0..MEASUREMENTS.len() {
        let stats = || rollups.iter().map(move |r| &r.stats[i]);
        let present = |value: fn(&Stats) -> f64| -> ArrayRef {
            Arc::new(Float64Array::from_iter(
                stats().map(|s| (s.count > 0).then(|| value(s))),
            ))
        };
        columns.push(Arc::new(UInt64Array::from_iter_values(
            stats().map(|s| s.count),
        )));
        columns.push(present(|s| s.min));
        columns.push(present(|s| s.max));
        columns.push(present(|s| s.mean().unwrap_or_default()));
        columns.push(present(|s| s.sum));
    }
    let seqs = || rollups.iter().map(|r| r.seqs.filter(Seqs::numbered));
    columns.push(Arc::new(Int64Array::from_iter(
        seqs().map(|q| q.map(|q| q.first)),
    )));
    columns.push(Arc::new(Int64Array::from_iter(
        seqs().map(|q| q.map(|q| q.last)),
    )));
    columns.push(Arc::new(UInt64Array::from_iter(
        seqs().map(|q| q.map(|q| q.distinct)),
    )));
    columns.push(Arc::new(UInt64Array::from_iter(
        seqs().map(|q| q.map(|q| q.missing)),
    )));
    let schema = arrow_schema();
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(ZSTD_LEVEL).unwrap_or_default(),
        ))
        .set_created_by("telemetry dashboard (rollups)".into())
        .build();
    let mut out = Vec::with_capacity(rollups.len() * 64 + 4096);
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::Interval;
    use arrow_array::{Array, Float64Array, UInt64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn rollup(start_ms: i64, temperatures: &[f64]) -> Rollup {
        let mut stats: [Stats; 3] = Default::default();
        for t in temperatures {
            stats[0].count += 1;
            stats[0].min = stats[0].min.min(*t);
            stats[0].max = stats[0].max.max(*t);
            stats[0].sum += t;
        }
        Rollup {
            device_id: "d-1".into(),
            interval: Interval::Hour,
            start_ms,
            count: temperatures.len() as u64,
            first_at_ms: start_ms + 1,
            last_at_ms: start_ms + 2,
            stats,
            seqs: None,
        }
    }

    #[test]
    fn rollups_read_back_with_nulls_for_measurements_a_period_lacks() {
        let rollups = [
            rollup(3_600_000, &[1.0, 2.0, 6.0]),
            Rollup {
                seqs: Some(Seqs {
                    first: 8,
                    last: 12,
                    distinct: 4,
                    missing: 1,
                }),
                ..rollup(7_200_000, &[4.0])
            },
        ];
        let bytes = encode(&rollups).unwrap();
        let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let batch = &batches[0];
        assert_eq!(batch.schema(), arrow_schema());
        assert_eq!(batch.num_rows(), 2);
        let f64s = |name: &str| {
            batch
                .column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .clone()
        };
        assert_eq!(f64s("temperature_mean").value(0), 3.0);
        assert_eq!(f64s("temperature_sum").value(1), 4.0);
        assert!(f64s("humidity_min").is_null(0));
        let counts = batch.column_by_name("humidity_count").unwrap();
        let counts = counts.as_any().downcast_ref::<UInt64Array>().unwrap();
        assert_eq!(counts.value(0), 0);
        let missing = batch.column_by_name("seq_missing").unwrap();
        let missing = missing.as_any().downcast_ref::<UInt64Array>().unwrap();
        assert!(missing.is_null(0), "no numbered reading, no ledger");
        assert_eq!(missing.value(1), 1);
    }

    #[test]
    fn no_rollups_is_an_empty_file_with_the_schema() {
        let bytes = encode(&[]).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        assert_eq!(reader.schema().as_ref(), arrow_schema().as_ref());
        assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
    }
}
