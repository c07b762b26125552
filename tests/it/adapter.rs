//! The storage adapter against real Azurite: the pitfalls that would lose data.

use infra::storage::{BatchOutcome, Entity};
use schemas::envelope::{DeviceMessage, EnvelopeBuilder};
use serde_json::json;
use std::time::Duration;
use tests::{unique, Azurite};

fn entity(v: serde_json::Value) -> Entity {
    v.as_object().expect("an object").clone()
}

#[tokio::test]
async fn adapter_pitfalls() {
    if !tests::servers_available("adapter_pitfalls") {
        return;
    }
    let azurite = Azurite::start().await;
    let account = azurite.account();

    // Messages never expire: Azure's default TTL (7 days) would silently delete a backlog.
    let queue = account.queue(&unique("q"));
    queue.create_if_missing().await.expect("create queue");
    queue
        .create_if_missing()
        .await
        .expect("creating twice is fine");
    // The largest envelope the builder will produce is accepted whole.
    let mut envelope = EnvelopeBuilder::default();
    let mut i = 0;
    while envelope
        .push(DeviceMessage::from_mqtt(
            "devices/d/telemetry",
            &[0xf0 ^ (i as u8); 700],
            i,
        ))
        .is_ok()
    {
        i += 1;
    }
    let text = envelope.finish();
    assert!(text.len() > 60_000);
    queue
        .put(text.clone())
        .await
        .expect("a full envelope fits the queue");
    let got = queue.get(32, Duration::from_secs(30)).await.expect("get");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, text);
    let years = (got[0].expires_at_ms - schemas::timefmt::now_ms()) / (365 * 86_400_000);
    assert!(years > 50, "messages expire in {years} years");
    // Giving a message back or hiding it longer changes its visibility only: the text is not
    // sent again, and the service keeps it whole.
    let back = queue
        .hide(&got[0], Duration::ZERO)
        .await
        .expect("given back");
    assert_ne!(back.pop_receipt, got[0].pop_receipt);
    let again = queue.get(32, Duration::from_secs(30)).await.expect("get");
    assert_eq!(again.len(), 1);
    assert!(again[0].text == text && again[0].dequeue_count == 2);
    queue
        .hide(&again[0], Duration::from_secs(60))
        .await
        .expect("hidden longer");
    assert!(queue
        .get(32, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    assert!(
        queue
            .hide(&again[0], Duration::ZERO)
            .await
            .unwrap_err()
            .is_gone(),
        "an old pop receipt no longer works"
    );

    let table = account.table(&unique("t"));
    table.create_if_missing().await.expect("create table");
    let good = |rk: &str| entity(json!({"PartitionKey": "p", "RowKey": rk, "V": 1.5}));

    // A transaction the service refuses is reported as refused, not as success (the SDK's
    // future says Ok). A string property over 64 KiB is one refusal; a repeated RowKey is
    // another, which is why the processor deduplicates keys before batching.
    let bad = entity(json!({"PartitionKey": "p", "RowKey": "b", "S": "x".repeat(70_000)}));
    for batch in [vec![good("a"), bad.clone()], vec![good("a"), good("a")]] {
        let outcome = table
            .upsert_batch(&batch)
            .await
            .expect("the service answered");
        assert!(
            matches!(
                outcome,
                BatchOutcome::Rejected(infra::storage::Refusal::Content(_))
            ),
            "{outcome:?}"
        );
    }
    assert!(
        table
            .query("PartitionKey eq 'p'")
            .await
            .expect("query")
            .is_empty(),
        "nothing written"
    );

    // A single write refused for its content says so by the service's code, so the processor
    // dead-letters that reading instead of waiting on it.
    let err = table.upsert(&bad).await.unwrap_err();
    assert!(err.is_content_error() && !err.is_retriable(), "{err}");
    assert!(err.to_string().contains("PropertyValueTooLarge"), "{err}");

    // Keys are quoted and encoded on the way (the request is signed over the encoded path):
    // spaces, quotes, percent signs and non-ASCII survive a write, a transaction and a delete.
    let odd = ["dev 'x' 100% ü", "a+b=c,d;e(f)", "日本"];
    for pk in odd {
        let row = entity(json!({"PartitionKey": pk, "RowKey": "r'1", "V": 1}));
        table.upsert(&row).await.expect("odd keys upsert");
        let more: Vec<Entity> = ["r 2", "r%3"]
            .iter()
            .map(|rk| entity(json!({"PartitionKey": pk, "RowKey": rk, "V": 2})))
            .collect();
        assert_eq!(
            table.upsert_batch(&more).await.expect("odd keys batch"),
            BatchOutcome::Committed
        );
        let merged = [entity(json!({"PartitionKey": pk, "RowKey": "r'1", "W": 3}))];
        assert_eq!(
            table.merge_batch(&merged).await.expect("odd keys merge"),
            BatchOutcome::Committed
        );
        let filter = format!("PartitionKey eq '{}'", pk.replace('\'', "''"));
        let stored = table.query(&filter).await.expect("query odd keys");
        assert_eq!(stored.len(), 3, "{pk}: {stored:?}");
        let first = stored.iter().find(|e| e["RowKey"] == "r'1").expect("r'1");
        assert_eq!((&first["V"], &first["W"]), (&json!(1), &json!(3)), "merged");
        let refs: Vec<_> = stored
            .iter()
            .map(|e| infra::storage::RowRef::of(e).expect("keys and etag"))
            .collect();
        assert_eq!(
            table.delete_batch(&refs).await.expect("odd keys delete"),
            BatchOutcome::Committed
        );
        assert!(table.query(&filter).await.expect("query").is_empty());
    }
    // A delete with a stale ETag deletes nothing and says the row changed.
    table.upsert(&good("e")).await.expect("upsert");
    let read = table.query("RowKey eq 'e'").await.expect("query");
    table.upsert(&good("e")).await.expect("changed since read");
    let stale = infra::storage::RowRef::of(&read[0]).expect("keys and etag");
    assert_eq!(
        table.delete_batch(&[stale]).await.expect("answered"),
        BatchOutcome::Rejected(infra::storage::Refusal::Changed(412))
    );
    table.delete_table().await.expect("drop");
    let table = account.table(&unique("t"));
    table.create_if_missing().await.expect("create table");

    // Mixed partitions and oversize batches are refused before sending (Azurite would accept).
    let other = entity(json!({"PartitionKey": "q", "RowKey": "a"}));
    let err = table.upsert_batch(&[good("a"), other]).await.unwrap_err();
    assert!(
        !err.is_retriable() && err.to_string().contains("spans partitions"),
        "{err}"
    );
    let many: Vec<Entity> = (0..101).map(|i| good(&format!("{i:03}"))).collect();
    assert!(table.upsert_batch(&many).await.is_err());

    // Upserts are idempotent; a committed batch is committed.
    assert_eq!(
        table.upsert_batch(&many[..100]).await.expect("batch"),
        BatchOutcome::Committed
    );
    assert_eq!(
        table.upsert_batch(&many[..100]).await.expect("again"),
        BatchOutcome::Committed
    );
    assert_eq!(
        table
            .query("PartitionKey eq 'p'")
            .await
            .expect("query")
            .len(),
        100
    );

    // An unreachable service is a retriable error, not a hang.
    let mut azurite = azurite;
    azurite.stop().await;
    let err = queue.put("x".into()).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
}

#[tokio::test]
async fn a_query_page_past_a_mebibyte_is_read_whole() {
    if !tests::servers_available("large_query_page") {
        return;
    }
    let azurite = Azurite::start().await;
    let table = azurite.account().table(&unique("big"));
    table.create_if_missing().await.expect("create table");
    // 1,000 rows of about 1.5 KiB: one full page, about 1.6 MiB with its metadata.
    let padding = "x".repeat(1_500);
    for chunk in 0..10 {
        let rows: Vec<Entity> = (0..100)
            .map(|i| {
                entity(json!({
                    "PartitionKey": "p",
                    "RowKey": format!("{:04}", chunk * 100 + i),
                    "Padding": padding,
                }))
            })
            .collect();
        assert_eq!(
            table.upsert_batch(&rows).await.expect("written"),
            BatchOutcome::Committed
        );
    }
    let rows = table.query("PartitionKey eq 'p'").await.expect("queried");
    assert_eq!(rows.len(), 1_000);
    assert_eq!(rows[999]["RowKey"], "0999");
}

/// Inserts that refuse an existing row and merges that refuse a missing one, in one
/// transaction: the service names the operation presumed wrongly, and writes nothing.
#[tokio::test]
async fn inserts_and_updates_name_the_row_presumed_wrongly() {
    use infra::storage::{Placed, Presence};
    if !tests::servers_available("inserts_and_updates_name_the_row_presumed_wrongly") {
        return;
    }
    let azurite = Azurite::start().await;
    let table = azurite.account().table(&unique("t"));
    table.create_if_missing().await.expect("create table");
    let row = |rk: &str, v: i64| entity(json!({"PartitionKey": "p", "RowKey": rk, "First": v}));
    let all = |p: Presence| -> Vec<(Presence, Entity)> {
        ["a", "b", "c"].iter().map(|rk| (p, row(rk, 1))).collect()
    };
    assert_eq!(
        table.insert_or_update(&all(Presence::New)).await.unwrap(),
        Placed::Committed
    );
    assert_eq!(
        table.insert_or_update(&all(Presence::New)).await.unwrap(),
        Placed::Mistaken(0),
        "the first insert finds its row"
    );
    let mixed = vec![
        (Presence::Existing, row("a", 2)),
        (Presence::Existing, row("b", 2)),
        (Presence::Existing, row("d", 2)),
        (Presence::New, row("c", 2)),
    ];
    assert_eq!(
        table.insert_or_update(&mixed).await.unwrap(),
        Placed::Mistaken(2),
        "an update of a row that is not there"
    );
    let stored = table.query("PartitionKey eq 'p'").await.expect("query");
    assert!(
        stored.iter().all(|e| e["First"] == json!(1)) && stored.len() == 3,
        "nothing written by a refused transaction: {stored:?}"
    );
    let right = vec![
        (
            Presence::Existing,
            entity(json!({"PartitionKey": "p", "RowKey": "a", "Last": 3})),
        ),
        (Presence::New, row("d", 3)),
    ];
    assert_eq!(
        table.insert_or_update(&right).await.unwrap(),
        Placed::Committed
    );
    let a = table.query("RowKey eq 'a'").await.expect("query");
    assert_eq!(
        (&a[0]["First"], &a[0]["Last"]),
        (&json!(1), &json!(3)),
        "merged, First kept"
    );
    assert_eq!(table.count("PartitionKey eq 'p'").await.unwrap(), 4);
}
