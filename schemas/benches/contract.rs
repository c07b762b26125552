//! Micro-benchmarks of the per-reading work on the hot path: validating a device message,
//! packing messages into a queue envelope (and unpacking it), and encoding the table entity.
//!
//! `cargo bench -p schemas` runs them; `cargo bench -p schemas -- validate` picks some.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use schemas::envelope::{decode, DeviceMessage, EnvelopeBuilder};
use schemas::reading::{validate, Override, Policy};
use std::hint::black_box;

const PREFIX: &str = "devices";
const NOW_MS: i64 = 1_790_000_000_000;

fn reading_json(i: i64) -> String {
    format!(
        r#"{{"deviceId":"sensor-000042","timestamp":"2026-09-21T14:{:02}:{:02}.000Z","seq":{i},"temperature":{:.2},"humidity":{:.1},"pressure":{:.1},"battery":0.87}}"#,
        (i / 60) % 60,
        i % 60,
        20.0 + i as f64 * 0.01,
        45.0 + i as f64 * 0.1 % 10.0,
        1013.0 - i as f64 * 0.05 % 3.0,
    )
}

fn single() -> Vec<u8> {
    reading_json(7).into_bytes()
}

fn gateway() -> Vec<u8> {
    let items: Vec<String> = (0..100).map(reading_json).collect();
    format!("[{}]", items.join(",")).into_bytes()
}

fn bench_validate(c: &mut Criterion) {
    let topic = schemas::reading::topic_for(PREFIX, "sensor-000042");
    let policy = Policy {
        max_age: std::time::Duration::from_secs(u32::MAX.into()),
        ..Policy::default()
    };
    let mut group = c.benchmark_group("validate");
    for (name, payload, readings) in [("single", single(), 1), ("gateway_100", gateway(), 100)] {
        group.throughput(Throughput::Elements(readings));
        group.bench_function(name, |b| {
            b.iter(|| {
                let v = validate(
                    PREFIX,
                    &topic,
                    black_box(&payload),
                    payload.len(),
                    NOW_MS,
                    &policy,
                    &Override::NONE,
                );
                assert_eq!(v.readings.len() as u64, readings, "{:?}", v.rejections);
                v
            })
        });
    }
    group.finish();
}

fn messages(n: usize) -> Vec<DeviceMessage> {
    (0..n)
        .map(|i| {
            let device = format!("sensor-{i:06}");
            DeviceMessage::from_mqtt(
                &schemas::reading::topic_for(PREFIX, &device),
                reading_json(i as i64).as_bytes(),
                NOW_MS,
            )
        })
        .collect()
}

fn bench_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    let batch = messages(100);
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("pack_100", |b| {
        b.iter_batched(
            || batch.clone(),
            |batch| {
                let mut builder = EnvelopeBuilder::default();
                for m in batch {
                    builder.push(m).expect("100 readings fit one envelope");
                }
                builder.finish()
            },
            BatchSize::SmallInput,
        )
    });
    let mut builder = EnvelopeBuilder::default();
    for m in batch.iter().cloned() {
        builder.push(m).expect("100 readings fit one envelope");
    }
    let text = builder.finish();
    group.bench_function("unpack_100", |b| {
        b.iter(|| decode(black_box(&text)).expect("decodes"))
    });
    group.finish();
}

fn bench_entity(c: &mut Criterion) {
    let topic = schemas::reading::topic_for(PREFIX, "sensor-000042");
    let payload = single();
    let reading = validate(
        PREFIX,
        &topic,
        &payload,
        payload.len(),
        NOW_MS,
        &Policy {
            max_age: std::time::Duration::from_secs(u32::MAX.into()),
            ..Policy::default()
        },
        &Override::NONE,
    )
    .readings
    .remove(0);
    let mut group = c.benchmark_group("entity");
    group.throughput(Throughput::Elements(1));
    // What the processor does per reading: the row's body, written straight to bytes.
    group.bench_function("encode", |b| {
        b.iter(|| {
            let mut body = Vec::with_capacity(384);
            schemas::entity::encode(black_box(&reading), NOW_MS, &mut body);
            body
        })
    });
    // What it did before, and what the device table still does: a JSON map, serialised.
    group.bench_function("to_entity", |b| {
        b.iter(|| {
            let e = schemas::entity::to_entity(black_box(&reading), NOW_MS);
            serde_json::to_vec(&e).expect("an entity serialises")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_validate, bench_envelope, bench_entity);
criterion_main!(benches);
