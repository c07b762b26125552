//! Micro-benchmarks of the table write path before the network: building, signing and
//! encoding one upsert and one 100-entity transaction (`infra::storage`'s lean path: the
//! request from `wire.rs`, the bytes `h1.rs` writes), with a shared key and with a SAS.
//! Sending is left out: that is the network's and the service's.
//!
//! `cargo bench -p infra` runs them; `cargo bench -p infra -- upsert` picks some.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use infra::storage::{Account, Row, DEVELOPMENT_STORAGE};
use std::hint::black_box;
use std::time::Duration;

const SAS: &str = "AccountName=acme;TableEndpoint=https://acme.table.core.windows.net;SharedAccessSignature=sv=2022-11-02&ss=t&srt=o&sp=au&se=2030-01-01T00:00:00Z&sig=c2lnbmF0dXJl";

/// A seed-profile reading's row: what the processor writes.
fn row(i: usize) -> Row {
    let at = format!("2026-09-21T14:{:02}:{:02}.000Z", (i / 60) % 60, i % 60);
    let json = format!(
        r#"{{"PartitionKey":"sensor-000042","RowKey":"{at}","MeasuredAt@odata.type":"Edm.DateTime","MeasuredAt":"{at}","Seq@odata.type":"Edm.Int64","Seq":"{i}","Temperature@odata.type":"Edm.Double","Temperature":21.5,"Humidity@odata.type":"Edm.Double","Humidity":45.1,"Pressure@odata.type":"Edm.Double","Pressure":1013.2,"Ext_battery@odata.type":"Edm.Double","Ext_battery":0.87,"IngestedAt@odata.type":"Edm.DateTime","IngestedAt":"{at}"}}"#
    );
    Row {
        partition_key: "sensor-000042".into(),
        row_key: at,
        json: json.into_bytes().into(),
    }
}

fn bench_requests(c: &mut Criterion) {
    let timeout = Duration::from_secs(5);
    let accounts = [("shared_key", DEVELOPMENT_STORAGE), ("sas", SAS)];
    let one = row(7);
    let hundred: Vec<Row> = (0..100).map(row).collect();
    let mut group = c.benchmark_group("table_request");
    for (name, connection) in accounts {
        let table = Account::from_connection_string(connection, timeout)
            .expect("a valid connection string")
            .table("telemetry");
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("upsert_{name}"), |b| {
            b.iter(|| table.build_upsert(black_box(&one)).expect("built"))
        });
        group.throughput(Throughput::Elements(100));
        group.bench_function(format!("batch_100_{name}"), |b| {
            b.iter(|| table.build_upsert_rows(black_box(&hundred)).expect("built"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_requests);
criterion_main!(benches);
