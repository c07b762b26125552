//! Micro-benchmarks of the table write path (`infra::storage`'s lean path):
//! - `table_request`: building and signing one upsert and one 100-entity transaction
//!   (`wire.rs`), with a shared key and with a SAS, before the network;
//! - `table_round_trip`: one upsert sent and its response read, on a kept-alive loopback
//!   connection to a stand-in server that answers every request with 204 at once: the
//!   client's whole HTTP cost per request (`pool.rs` on hyper), with the server's kept small;
//!   and one 100-entity transaction, answered as Azure answers one (202, a multipart body of
//!   100 parts, about 36 KiB): the response's body read and its statuses parsed.
//!
//! `cargo bench -p infra` runs them; `cargo bench -p infra -- upsert` picks some.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use infra::storage::{Account, Row, DEVELOPMENT_STORAGE};
use std::hint::black_box;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A committed 100-operation transaction's response, with the headers Azure gives each part.
fn transaction_answer() -> Vec<u8> {
    let mut body = String::from(
        "--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n",
    );
    for i in 0..100 {
        body.push_str(&format!(
            "--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
             HTTP/1.1 204 No Content\r\nContent-ID: {}\r\nX-Content-Type-Options: nosniff\r\n\
             Cache-Control: no-cache\r\nPreference-Applied: return-no-content\r\nDataServiceVersion: 3.0;\r\n\
             Location: https://acme.table.core.windows.net/telemetry(PartitionKey='sensor-000042',RowKey='2026-09-21T14%3A00%3A{:02}.000Z')\r\n\
             DataServiceId: https://acme.table.core.windows.net/telemetry(PartitionKey='sensor-000042',RowKey='2026-09-21T14%3A00%3A{:02}.000Z')\r\n\
             ETag: W/\"datetime'2026-09-21T14%3A00%3A00.1234567Z'\"\r\n\r\n",
            i + 1,
            i % 60,
            i % 60
        ));
    }
    body.push_str("--changesetresponse_2--\r\n--batchresponse_1--\r\n");
    let mut answer = format!(
        "HTTP/1.1 202 Accepted\r\nContent-Type: multipart/mixed; boundary=batchresponse_1\r\n\
         Cache-Control: no-cache\r\nDataServiceVersion: 1.0;\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body.as_bytes());
    answer
}

/// A server on a free loopback port that answers each request (head and Content-Length body),
/// keeping the connection: a transaction (a POST) as committed, anything else with
/// `204 No Content`. Returns its port.
async fn stand_in() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("bound").port();
    tokio::spawn(async move {
        let transaction_answer = std::sync::Arc::new(transaction_answer());
        while let Ok((mut socket, _)) = listener.accept().await {
            let transaction_answer = transaction_answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(8192);
                loop {
                    let mut chunk = [0u8; 8192];
                    let Ok(n) = socket.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if buf.len() < end + 4 + length {
                            break;
                        }
                        let batch = head.starts_with("post ");
                        buf.drain(..end + 4 + length);
                        let answer: &[u8] = if batch {
                            &transaction_answer
                        } else {
                            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
                        };
                        if socket.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

fn bench_round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let port = runtime.block_on(stand_in());
    let connection = format!(
        "AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;\
         TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1"
    );
    let table = Account::from_connection_string(&connection, Duration::from_secs(5))
        .expect("a valid connection string")
        .table("telemetry");
    let one = row(7);
    let hundred: Vec<Row> = (0..100).map(row).collect();
    let mut group = c.benchmark_group("table_round_trip");
    group.throughput(Throughput::Elements(1));
    group.bench_function("upsert_shared_key", |b| {
        b.iter(|| {
            runtime
                .block_on(table.upsert_row(black_box(&one)))
                .expect("answered")
        })
    });
    group.throughput(Throughput::Elements(100));
    group.bench_function("batch_100_shared_key", |b| {
        b.iter(|| {
            let outcome = runtime
                .block_on(table.upsert_rows(black_box(&hundred)))
                .expect("answered");
            assert!(matches!(outcome, infra::storage::BatchOutcome::Committed));
        })
    });
    group.finish();
}

criterion_group!(benches, bench_requests, bench_round_trip);
criterion_main!(benches);
