//! The archive format: what one device-day of readings becomes once it leaves the table.
//!
//! One Arrow schema ([`arrow_schema`]) and one set of Parquet writer properties
//! ([`writer_properties`]) define every Parquet archive; JSON Lines ([`Format::Json`]) carries
//! the same fields for users who want the original design's text files. Both formats decode
//! back into [`StoredReading`]s, which is what merging late data into an existing archive needs.
//!
//! Rows are always sorted by `measured_at` and unique by it (the RowKey), and an empty archive
//! is never encoded: [`encode`] refuses it. Where a device-day's archive lives is [`layout`]'s.

use crate::entity::StoredReading;
use crate::reading::{Extra, Reading};
use crate::timefmt;
use arrow_array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub mod layout;
pub mod rollups;

/// Bumped whenever the columns change; recorded in every archive's footer and blob metadata.
pub const SCHEMA_VERSION: u32 = 1;
/// Rows per Parquet row group. A device-day at one reading per second is 86,400 rows, so a
/// file is at most two groups: small enough to read in one go, large enough to compress well.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;
/// ZSTD level: 3 is zstd's default and the usual choice for analytics files.
const ZSTD_LEVEL: i32 = 3;
/// The timestamp columns' zone, spelled as analysts' tools expect it.
const UTC: &str = "UTC";
/// Prefix of the key-value metadata this project writes into the Parquet footer.
const FOOTER_PREFIX: &str = "telemetry.";

/// Column names, in schema order.
pub mod col {
    pub const DEVICE_ID: &str = "device_id";
    pub const MEASURED_AT: &str = "measured_at";
    pub const INGESTED_AT: &str = "ingested_at";
    pub const SEQ: &str = "seq";
    pub const TEMPERATURE: &str = "temperature";
    pub const HUMIDITY: &str = "humidity";
    pub const PRESSURE: &str = "pressure";
    /// The reading's extra properties as one JSON object (Int64 values keep full precision).
    pub const EXTRAS: &str = "extras";
}

/// The archive's Arrow schema: timestamps are UTC microseconds, measurements nullable doubles.
pub fn arrow_schema() -> SchemaRef {
    let utc_micros = || DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()));
    Arc::new(Schema::new(vec![
        Field::new(col::DEVICE_ID, DataType::Utf8, false),
        Field::new(col::MEASURED_AT, utc_micros(), false),
        Field::new(col::INGESTED_AT, utc_micros(), false),
        Field::new(col::SEQ, DataType::Int64, true),
        Field::new(col::TEMPERATURE, DataType::Float64, true),
        Field::new(col::HUMIDITY, DataType::Float64, true),
        Field::new(col::PRESSURE, DataType::Float64, true),
        Field::new(col::EXTRAS, DataType::Utf8, true),
    ]))
}

/// An archive's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Parquet,
    /// JSON Lines, one reading per line, as in the original design's `.json` archives.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    /// `parquet` or `json`: the archiver's `ARCHIVER_FORMAT` and the dashboard's
    /// `DASHBOARD_ARCHIVE_FORMAT` both read it here, so the two cannot disagree.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "parquet" => Ok(Format::Parquet),
            "json" => Ok(Format::Json),
            _ => Err("expected parquet or json".to_owned()),
        }
    }
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Json => "json",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Json => "application/x-ndjson",
        }
    }
}

/// Why an archive could not be encoded or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("refusing to write an empty archive")]
    Empty,
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("not an archive of this schema: {0}")]
    Schema(String),
    #[error("line {line}: {detail}")]
    Json { line: usize, detail: String },
}

/// What an archive holds, as recorded in its footer and its blob metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub rows: usize,
    pub min_measured_ms: i64,
    pub max_measured_ms: i64,
}

impl Summary {
    /// `None` for no rows. `rows` must be sorted by time, as [`merge`] returns them.
    pub fn of(rows: &[StoredReading]) -> Option<Self> {
        Some(Self {
            rows: rows.len(),
            min_measured_ms: rows.first()?.reading.measured_at_ms,
            max_measured_ms: rows.last()?.reading.measured_at_ms,
        })
    }

    /// Name/value pairs for blob metadata (names are valid C# identifiers, as Azure requires).
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        vec![
            ("rows", self.rows.to_string()),
            ("min_time", timefmt::format_ms(self.min_measured_ms)),
            ("max_time", timefmt::format_ms(self.max_measured_ms)),
            ("schema_version", SCHEMA_VERSION.to_string()),
        ]
    }
}

/// Unites an archive's rows with newer ones from the table: one row per timestamp, the
/// table's version winning, sorted by time. Never fewer rows than `existing` holds.
pub fn merge(existing: Vec<StoredReading>, newer: Vec<StoredReading>) -> Vec<StoredReading> {
    let mut by_time = BTreeMap::new();
    for row in existing.into_iter().chain(newer) {
        by_time.insert(row.reading.measured_at_ms, row);
    }
    by_time.into_values().collect()
}

/// The writer properties of every Parquet archive: ZSTD, delta-encoded timestamps, bounded row
/// groups, and the [`Summary`] in the footer.
pub fn writer_properties(summary: Option<&Summary>) -> WriterProperties {
    let footer = summary
        .map(Summary::metadata)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| KeyValue::new(format!("{FOOTER_PREFIX}{k}"), v))
        .collect();
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(ZSTD_LEVEL).unwrap_or_default(),
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(format!("telemetry archiver (schema v{SCHEMA_VERSION})"))
        .set_key_value_metadata(Some(footer));
    for time_col in [col::MEASURED_AT, col::INGESTED_AT, col::SEQ] {
        let path = ColumnPath::from(time_col);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
    }
    props.build()
}

/// Encodes rows (sorted and unique by time, as [`merge`] returns them) in `format`.
pub fn encode(format: Format, rows: &[StoredReading]) -> Result<Bytes, ArchiveError> {
    let summary = Summary::of(rows).ok_or(ArchiveError::Empty)?;
    match format {
        Format::Parquet => encode_parquet(rows, Some(&summary)),
        Format::Json => Ok(encode_json_lines(rows)),
    }
}

/// Reads an archive back.
pub fn decode(format: Format, bytes: Bytes) -> Result<Vec<StoredReading>, ArchiveError> {
    match format {
        Format::Parquet => decode_parquet(bytes),
        Format::Json => decode_json_lines(&bytes),
    }
}

/// Rows as Parquet in the archive's schema, for a download rather than an archive: none is an
/// empty file (the schema, no rows, no summary in the footer).
pub fn encode_download(rows: &[StoredReading]) -> Result<Bytes, ArchiveError> {
    encode_parquet(rows, Summary::of(rows).as_ref())
}

fn encode_parquet(
    rows: &[StoredReading],
    summary: Option<&Summary>,
) -> Result<Bytes, ArchiveError> {
    let micros = |ms: i64| ms * 1000;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reading.device_id.as_str()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| micros(r.reading.measured_at_ms)),
            )
            .with_timezone(UTC),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| micros(r.ingested_at_ms)),
            )
            .with_timezone(UTC),
        ),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.reading.seq))),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.reading.temperature),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.reading.humidity),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.reading.pressure),
        )),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| {
            (!r.reading.extras.is_empty())
                .then(|| Value::Object(extras_json(&r.reading)).to_string())
        }))),
    ];
    let batch = RecordBatch::try_new(arrow_schema(), columns)?;
    let mut out = Vec::with_capacity(rows.len() * 24 + 4096);
    let mut writer =
        ArrowWriter::try_new(&mut out, arrow_schema(), Some(writer_properties(summary)))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(out))
}

fn decode_parquet(bytes: Bytes) -> Result<Vec<StoredReading>, ArchiveError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let expected = arrow_schema();
    let found = builder.schema();
    for field in expected.fields() {
        let matches = found
            .field_with_name(field.name())
            .is_ok_and(|f| f.data_type() == field.data_type());
        if !matches {
            return Err(ArchiveError::Schema(format!(
                "column {} is missing or not {}",
                field.name(),
                field.data_type()
            )));
        }
    }
    let mut rows =
        Vec::with_capacity(builder.metadata().file_metadata().num_rows().max(0) as usize);
    for batch in builder.build()? {
        let batch = batch?;
        let column = |name: &str| batch.column_by_name(name).cloned();
        let typed = |name: &str| -> Result<ArrayRef, ArchiveError> {
            column(name).ok_or_else(|| ArchiveError::Schema(format!("no column {name}")))
        };
        let device = typed(col::DEVICE_ID)?;
        let device = downcast::<StringArray>(&device)?;
        let measured = typed(col::MEASURED_AT)?;
        let measured = downcast::<TimestampMicrosecondArray>(&measured)?;
        let ingested = typed(col::INGESTED_AT)?;
        let ingested = downcast::<TimestampMicrosecondArray>(&ingested)?;
        let seq = typed(col::SEQ)?;
        let seq = downcast::<Int64Array>(&seq)?;
        let (t, h, p) = (
            typed(col::TEMPERATURE)?,
            typed(col::HUMIDITY)?,
            typed(col::PRESSURE)?,
        );
        let (t, h, p) = (
            downcast::<Float64Array>(&t)?,
            downcast::<Float64Array>(&h)?,
            downcast::<Float64Array>(&p)?,
        );
        let extras = typed(col::EXTRAS)?;
        let extras = downcast::<StringArray>(&extras)?;
        let opt_f = |a: &Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        for i in 0..batch.num_rows() {
            let extras = if extras.is_valid(i) {
                let value: Value = serde_json::from_str(extras.value(i))
                    .map_err(|e| ArchiveError::Schema(format!("row {i}: extras: {e}")))?;
                extras_from_json(&value)
                    .ok_or_else(|| ArchiveError::Schema(format!("row {i}: extras not an object")))?
            } else {
                Vec::new()
            };
            rows.push(StoredReading {
                reading: Reading {
                    device_id: device.value(i).to_owned(),
                    measured_at_ms: measured.value(i).div_euclid(1000),
                    seq: seq.is_valid(i).then(|| seq.value(i)),
                    temperature: opt_f(t, i),
                    humidity: opt_f(h, i),
                    pressure: opt_f(p, i),
                    extras,
                },
                ingested_at_ms: ingested.value(i).div_euclid(1000),
            });
        }
    }
    Ok(rows)
}

fn downcast<T: 'static>(array: &ArrayRef) -> Result<&T, ArchiveError> {
    array.as_any().downcast_ref::<T>().ok_or_else(|| {
        ArchiveError::Schema(format!("unexpected column type {}", array.data_type()))
    })
}

/// Reads the [`Summary`] a Parquet archive's footer records, without decoding its rows.
pub fn parquet_footer_summary(bytes: Bytes) -> Result<Summary, ArchiveError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let meta = builder.metadata().file_metadata();
    let kv = meta.key_value_metadata().cloned().unwrap_or_default();
    let get = |key: &str| {
        kv.iter()
            .find(|e| e.key == format!("{FOOTER_PREFIX}{key}"))
            .and_then(|e| e.value.clone())
            .ok_or_else(|| ArchiveError::Schema(format!("footer has no {FOOTER_PREFIX}{key}")))
    };
    let time = |key: &str| {
        get(key).and_then(|s| {
            timefmt::parse_rfc3339_ms(&s)
                .ok_or_else(|| ArchiveError::Schema(format!("footer {key} {s:?}")))
        })
    };
    let rows: usize = get("rows")?
        .parse()
        .map_err(|_| ArchiveError::Schema("footer rows is not a number".into()))?;
    if rows as i64 != meta.num_rows() {
        return Err(ArchiveError::Schema(format!(
            "footer says {rows} rows, file holds {}",
            meta.num_rows()
        )));
    }
    Ok(Summary {
        rows,
        min_measured_ms: time("min_time")?,
        max_measured_ms: time("max_time")?,
    })
}

fn extras_json(reading: &Reading) -> Map<String, Value> {
    reading
        .extras
        .iter()
        .map(|(name, extra)| {
            let v = match extra {
                Extra::Int(i) => Value::from(*i),
                Extra::Float(f) => Value::from(*f),
                Extra::Bool(b) => Value::from(*b),
                Extra::Str(s) => Value::from(s.as_str()),
            };
            (name.clone(), v)
        })
        .collect()
}

fn extras_from_json(value: &Value) -> Option<Vec<(String, Extra)>> {
    let mut extras: Vec<(String, Extra)> = value
        .as_object()?
        .iter()
        .map(|(name, v)| {
            let extra = match v {
                Value::Bool(b) => Extra::Bool(*b),
                Value::String(s) => Extra::Str(s.clone()),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => Extra::Int(i),
                    None => Extra::Float(n.as_f64()?),
                },
                _ => return None,
            };
            Some((name.clone(), extra))
        })
        .collect::<Option<_>>()?;
    extras.sort_by(|a, b| a.0.cmp(&b.0));
    Some(extras)
}

/// One JSON object per line: the device message's field names plus `ingestedAt`, with the
/// extras nested under `extras` so that no extra can collide with a contract field.
fn encode_json_lines(rows: &[StoredReading]) -> Bytes {
    let mut out = Vec::with_capacity(rows.len() * 160);
    for r in rows {
        let mut o = Map::new();
        o.insert("deviceId".into(), r.reading.device_id.as_str().into());
        o.insert(
            "timestamp".into(),
            timefmt::format_ms(r.reading.measured_at_ms).into(),
        );
        o.insert(
            "ingestedAt".into(),
            timefmt::format_ms(r.ingested_at_ms).into(),
        );
        if let Some(seq) = r.reading.seq {
            o.insert("seq".into(), seq.into());
        }
        for (name, v) in [
            ("temperature", r.reading.temperature),
            ("humidity", r.reading.humidity),
            ("pressure", r.reading.pressure),
        ] {
            if let Some(v) = v {
                o.insert(name.into(), v.into());
            }
        }
        if !r.reading.extras.is_empty() {
            o.insert("extras".into(), Value::Object(extras_json(&r.reading)));
        }
        // Writing a Value into a Vec cannot fail.
        serde_json::to_writer(&mut out, &Value::Object(o)).unwrap_or_default();
        out.push(b'\n');
    }
    Bytes::from(out)
}

fn decode_json_lines(bytes: &[u8]) -> Result<Vec<StoredReading>, ArchiveError> {
    let mut rows = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |detail: String| ArchiveError::Json {
            line: n + 1,
            detail,
        };
        let v: Value = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{k} is missing")))
        };
        let time = |k: &str| {
            text(k)
                .and_then(|s| timefmt::parse_rfc3339_ms(s).ok_or_else(|| bad(format!("{k} {s:?}"))))
        };
        let number = |k: &str| v.get(k).and_then(Value::as_f64);
        let extras = match v.get("extras") {
            Some(e) => extras_from_json(e).ok_or_else(|| bad("extras is not an object".into()))?,
            None => Vec::new(),
        };
        rows.push(StoredReading {
            reading: Reading {
                device_id: text("deviceId")?.to_owned(),
                measured_at_ms: time("timestamp")?,
                seq: v.get("seq").and_then(Value::as_i64),
                temperature: number("temperature"),
                humidity: number("humidity"),
                pressure: number("pressure"),
                extras,
            },
            ingested_at_ms: time("ingestedAt")?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_flag_reads_two_names() {
        assert_eq!("parquet".parse(), Ok(Format::Parquet));
        assert_eq!("json".parse(), Ok(Format::Json));
        assert_eq!(
            "xml".parse::<Format>(),
            Err("expected parquet or json".to_owned())
        );
    }

    fn row(ms: i64, temperature: f64) -> StoredReading {
        StoredReading {
            reading: Reading {
                device_id: "dev-1".into(),
                measured_at_ms: ms,
                seq: Some(ms / 1000),
                temperature: Some(temperature),
                humidity: None,
                pressure: Some(1013.25),
                extras: vec![
                    ("battery".into(), Extra::Int(9_007_199_254_740_993)),
                    ("charging".into(), Extra::Bool(true)),
                    ("fw".into(), Extra::Str("1.2.3".into())),
                    ("rssi".into(), Extra::Float(-71.0)),
                ],
            },
            ingested_at_ms: ms + 250,
        }
    }

    #[test]
    fn both_formats_round_trip_every_field() {
        let mut plain = row(1_705_312_800_123, 21.5);
        plain.reading.extras.clear();
        plain.reading.seq = None;
        let rows = vec![row(1_705_312_700_000, 3.0), plain];
        for format in [Format::Parquet, Format::Json] {
            let bytes = encode(format, &rows).unwrap();
            assert_eq!(decode(format, bytes).unwrap(), rows, "{format:?}");
        }
    }

    #[test]
    fn parquet_footer_records_the_summary() {
        let rows = vec![row(1_000, 1.0), row(2_000, 2.0), row(3_000, 3.0)];
        let bytes = encode(Format::Parquet, &rows).unwrap();
        let summary = parquet_footer_summary(bytes).unwrap();
        assert_eq!(
            summary,
            Summary {
                rows: 3,
                min_measured_ms: 1_000,
                max_measured_ms: 3_000
            }
        );
    }

    #[test]
    fn an_empty_archive_is_refused() {
        for format in [Format::Parquet, Format::Json] {
            assert!(matches!(encode(format, &[]), Err(ArchiveError::Empty)));
        }
    }

    #[test]
    fn merge_keeps_every_timestamp_once_and_prefers_the_table() {
        let existing = vec![row(1_000, 1.0), row(3_000, 3.0)];
        let newer = vec![row(3_000, 30.0), row(2_000, 2.0)];
        let merged = merge(existing, newer);
        let got: Vec<(i64, Option<f64>)> = merged
            .iter()
            .map(|r| (r.reading.measured_at_ms, r.reading.temperature))
            .collect();
        assert_eq!(
            got,
            vec![(1_000, Some(1.0)), (2_000, Some(2.0)), (3_000, Some(30.0))]
        );
    }

    #[test]
    fn foreign_parquet_is_refused_not_misread() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1_i64])) as ArrayRef],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let err = decode(Format::Parquet, Bytes::from(out)).unwrap_err();
        assert!(err.to_string().contains("device_id"), "{err}");
    }
}
