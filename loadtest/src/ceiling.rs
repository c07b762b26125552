//! The raw storage ceiling: entities/s written straight to Table Storage, one per request and
//! in 100-entity transactions, at the same concurrency, into a scratch table.

use futures::future::join_all;
use infra::storage::{Account, Entity, MAX_BATCH_OPERATIONS};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub struct Ceiling {
    pub single_per_second: f64,
    pub batch_per_second: f64,
}

pub async fn measure(
    account: &Account,
    duration: Duration,
    concurrency: usize,
) -> anyhow::Result<Ceiling> {
    let table = account.table(&format!("ceiling{}", std::process::id()));
    table.create_if_missing().await?;
    let entity = |pk: String, rk: u64| -> Entity {
        let v = json!({
            "PartitionKey": pk,
            "RowKey": format!("{rk:012}"),
            "Temperature": 21.5, "Humidity": 40.0, "Pressure": 1013.0,
            "Seq@odata.type": "Edm.Int64", "Seq": rk.to_string(),
        });
        v.as_object().cloned().unwrap_or_default()
    };
    let run = |batch: bool| {
        let (table, entity) = (table.clone(), &entity);
        async move {
            let until = Instant::now() + duration;
            let workers = (0..concurrency.max(1)).map(|w| {
                let table = table.clone();
                async move {
                    let mut written = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < until {
                        n += 1;
                        let ok = if batch {
                            let pk = format!("b{w}-{n}");
                            let rows: Vec<Entity> = (0..MAX_BATCH_OPERATIONS as u64)
                                .map(|r| entity(pk.clone(), r))
                                .collect();
                            table.upsert_batch(&rows).await.is_ok()
                        } else {
                            table.upsert(&entity(format!("s{w}"), n)).await.is_ok()
                        };
                        if ok {
                            written += if batch {
                                MAX_BATCH_OPERATIONS as u64
                            } else {
                                1
                            };
                        }
                    }
                    written
                }
            });
            let started = Instant::now();
            let total: u64 = join_all(workers).await.into_iter().sum();
            total as f64 / started.elapsed().as_secs_f64()
        }
    };
    let single_per_second = run(false).await;
    let batch_per_second = run(true).await;
    if let Err(error) = table.delete_table().await {
        tracing::warn!(%error, "Cannot delete the scratch table.");
    }
    Ok(Ceiling {
        single_per_second,
        batch_per_second,
    })
}
