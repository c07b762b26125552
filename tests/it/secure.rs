//! The secure edge: the production broker configuration (TLS, passwords, client certificates,
//! the ACL), per-device identities, least-privilege storage credentials, a storage 403 in the
//! middle of a run, and no secret in any log or endpoint.

use infra::mqtt::{Connection, MqttArgs, Secret};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use schemas::timefmt::now_ms;
use std::path::PathBuf;
use std::time::Duration;
use tests::storage::{listen, publish_one, publish_with, reading, topic};
use tests::{unique, Azurite, SecureMosquitto, Service};

const FLEET_SECRET: &str = "fleet-secret-for-tests";

/// `user:password` lines for `devices`, derived from [`FLEET_SECRET`] as the simulator does.
fn device_credentials(devices: &[String]) -> String {
    let secret = Secret::new(FLEET_SECRET);
    devices
        .iter()
        .map(|d| {
            format!(
                "{d}:{}\n",
                infra::mqtt::device_password(&secret, d).expose()
            )
        })
        .collect()
}

/// A client of `url` that trusts `ca`, with optional credentials and client certificate.
fn client(
    url: &str,
    ca: PathBuf,
    user: Option<(&str, &str)>,
    cert: Option<(PathBuf, PathBuf)>,
) -> Connection {
    MqttArgs {
        mqtt_url: url.to_owned(),
        mqtt_ca_file: Some(ca),
        mqtt_client_cert: cert.as_ref().map(|c| c.0.clone()),
        mqtt_client_key: cert.map(|c| c.1),
        mqtt_username: user.map(|u| u.0.to_owned()),
        mqtt_password: user.map(|u| Secret::new(u.1)),
        mqtt_password_file: None,
    }
    .connection()
    .unwrap()
}

fn device(broker: &SecureMosquitto, id: &str) -> Connection {
    let password = infra::mqtt::device_password(&Secret::new(FLEET_SECRET), id);
    client(
        &broker.url(),
        broker.file("ca.crt"),
        Some((id, password.expose())),
        None,
    )
}

/// Ingest's environment for the password listener.
fn ingest_env(broker: &SecureMosquitto, storage: &str, queue: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MQTT_URL", broker.url()),
        ("MQTT_CA_FILE", broker.file("ca.crt").display().to_string()),
        ("MQTT_USERNAME", "ingest".into()),
        (
            "MQTT_PASSWORD_FILE",
            broker.file("ingest.password").display().to_string(),
        ),
        ("AZURE_STORAGE_CONNECTION_STRING", storage.to_owned()),
        ("INGEST_QUEUE_NAME", queue.to_owned()),
        ("INGEST_CLIENT_ID", unique("ingest")),
    ]
}

/// Names of one pipeline's queues and tables.
struct Names {
    queue: String,
    dead: String,
    table: String,
    devices: String,
}

impl Names {
    fn new() -> Self {
        Self {
            queue: unique("ingest"),
            dead: unique("dead"),
            table: unique("telemetry"),
            devices: unique("devices"),
        }
    }

    fn processor_env(&self, storage: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_CONNECTION_STRING", storage.to_owned()),
            ("PROCESSOR_QUEUE_NAME", self.queue.clone()),
            ("PROCESSOR_DEAD_LETTER_QUEUE", self.dead.clone()),
            ("PROCESSOR_TABLE_NAME", self.table.clone()),
            ("PROCESSOR_DEVICE_TABLE", self.devices.clone()),
            ("PROCESSOR_WORKERS", "2".into()),
        ]
    }
}

async fn rows(azurite: &Azurite, table: &str) -> Vec<infra::storage::Entity> {
    tests::storage::rows(&azurite.account(), table)
        .await
        .unwrap_or_default()
}

async fn wait_rows(azurite: &Azurite, table: &str, n: usize) -> Vec<infra::storage::Entity> {
    tests::wait_for(&format!("{n} rows"), Duration::from_secs(90), || async {
        let r = rows(azurite, table).await;
        (r.len() >= n).then_some(r)
    })
    .await
}

/// Waits until the service's `/readyz` answers 503 with a body containing `words`.
async fn wait_not_ready(svc: &Service, words: &str) -> String {
    tests::wait_for(
        &format!("readiness to say {words:?}"),
        Duration::from_secs(60),
        || async {
            let (status, body) = tests::services::http_get(svc.metrics_port, "/readyz").await?;
            (status == 503 && body.contains(words)).then_some(body)
        },
    )
    .await
}

#[tokio::test]
async fn the_secure_broker_binds_every_device_to_its_own_topic() {
    if !tests::servers_available("secure_broker") {
        return;
    }
    let ids: Vec<String> = ["sensor-00001", "sensor-00002"].map(String::from).to_vec();
    let credentials = device_credentials(&ids);
    let (azurite, broker) = tokio::join!(Azurite::start(), SecureMosquitto::start(&credentials));
    let names = Names::new();
    let storage = azurite.connection_string();
    let (ienv, penv) = (
        ingest_env(&broker, &storage, &names.queue),
        names.processor_env(&storage),
    );
    let (_ingest, _processor) = tokio::join!(
        Service::start("ingest", &ienv),
        Service::start("processor", &penv)
    );
    let ca = broker.file("ca.crt");
    let at = now_ms() - 60_000;

    // Strangers: no credentials, a wrong password, a device's password for another device.
    for (who, conn) in [
        ("anonymous", client(&broker.url(), ca.clone(), None, None)),
        (
            "wrong password",
            client(&broker.url(), ca.clone(), Some(("ingest", "guess")), None),
        ),
        ("borrowed password", {
            let other = infra::mqtt::device_password(&Secret::new(FLEET_SECRET), "sensor-00002");
            client(
                &broker.url(),
                ca.clone(),
                Some(("sensor-00001", other.expose())),
                None,
            )
        }),
    ] {
        let error = publish_one(
            &conn,
            &topic("sensor-00001"),
            reading("sensor-00001", at, 99),
        )
        .await
        .expect_err(who);
        let (failure, line) = infra::mqtt::describe(&conn.url, &error);
        assert!(
            matches!(
                failure,
                infra::mqtt::Failure::Credentials | infra::mqtt::Failure::NotAuthorised
            ),
            "{who}: {line}"
        );
    }

    // A device publishes as itself, and tries to publish as another device.
    let a = device(&broker, "sensor-00001");
    let b = device(&broker, "sensor-00002");
    assert_eq!(
        publish_one(&a, &topic("sensor-00001"), reading("sensor-00001", at, 1))
            .await
            .ok(),
        Some(PubAckReason::Success)
    );
    let forged = publish_one(
        &a,
        &topic("sensor-00002"),
        reading("sensor-00002", at + 1, 666),
    )
    .await;
    assert!(
        !matches!(
            forged,
            Ok(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
        ),
        "{forged:?}"
    );
    assert_eq!(
        publish_one(
            &b,
            &topic("sensor-00002"),
            reading("sensor-00002", at + 2, 2)
        )
        .await
        .ok(),
        Some(PubAckReason::Success)
    );

    // A device may subscribe to nothing: not to everything, not into ingest's share group
    // (where it would take a share of every reading), and it may not take over another
    // client's session by its client id.
    for filter in ["#", "$SYS/#", "$share/ingest/devices/+/telemetry"] {
        let listening = tokio::spawn({
            let a = a.clone();
            async move { listen(&a, filter, Duration::from_secs(3)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        publish_with(
            &b,
            vec![(topic("sensor-00002"), reading("sensor-00002", at + 3, 3))],
        )
        .await;
        let (codes, got) = listening.await.unwrap();
        assert!(
            matches!(codes.as_slice(), [SubscribeReasonCode::NotAuthorized]),
            "{filter}: {codes:?}"
        );
        assert_eq!(
            got,
            Vec::<String>::new(),
            "{filter}: a device received readings"
        );
    }
    let takeover = tests::storage::connect_as(&a, "ingest-1").await;
    assert!(takeover.is_err(), "a device connected as ingest-1");
    let stored = wait_rows(&azurite, &names.table, 3).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored = if rows(&azurite, &names.table).await.len() > stored.len() {
        rows(&azurite, &names.table).await
    } else {
        stored
    };
    let seqs: Vec<(String, i64)> = stored
        .iter()
        .map(|r| {
            (
                r["PartitionKey"].as_str().unwrap().to_owned(),
                r["Seq"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .or_else(|| r["Seq"].as_i64())
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seqs,
        vec![
            ("sensor-00001".into(), 1),
            ("sensor-00002".into(), 2),
            ("sensor-00002".into(), 3)
        ],
        "only each device's own readings, and the forged one nowhere"
    );
    let dead = tests::storage::drain_dead_letters(&azurite.account(), &names.dead).await;
    assert!(
        dead.is_empty(),
        "the forged reading became a dead letter: {dead:#?}"
    );

    // ingest refuses a broker whose certificate its CA file does not vouch for.
    let stranger = tests::TempDir::new("other-ca");
    let made = std::process::Command::new("bash")
        .arg(tests::repo_root().join("deploy/mosquitto/gen-identities.sh"))
        .arg(stranger.0.join("out"))
        .output()
        .unwrap();
    assert!(made.status.success());
    let mut env = ingest_env(&broker, &storage, &names.queue);
    env.retain(|(k, _)| *k != "MQTT_CA_FILE");
    env.push((
        "MQTT_CA_FILE",
        stranger.0.join("out/ca.crt").display().to_string(),
    ));
    let untrusting = Service::spawn("ingest", &env).await;
    let body = wait_not_ready(&untrusting, "not signed by a trusted CA").await;
    assert!(body.contains("TLS handshake"), "{body}");
    // And one with a wrong password says so, in one line, without the password.
    let mut env = ingest_env(&broker, &storage, &names.queue);
    env.retain(|(k, _)| *k != "MQTT_PASSWORD_FILE");
    env.push(("MQTT_PASSWORD", "not-the-password".into()));
    let refused = Service::spawn("ingest", &env).await;
    let body = wait_not_ready(&refused, "refused").await;
    assert!(!body.contains("not-the-password"), "{body}");
    assert!(!refused.log_text().contains("not-the-password"));
}

#[tokio::test]
async fn ingest_with_a_client_certificate_and_simulated_devices_with_their_own_identities() {
    if !tests::servers_available("secure_mtls") {
        return;
    }
    // The broker's password file comes from the documented command.
    let devices = 12;
    let printed = std::process::Command::new(tests::services::bin_path("simulator"))
        .args(["--print-credentials", "--devices", &devices.to_string()])
        .env("SIMULATOR_DEVICE_SECRET", FLEET_SECRET)
        .output()
        .unwrap();
    assert!(printed.status.success());
    let credentials = String::from_utf8(printed.stdout).unwrap();
    assert_eq!(credentials.lines().count(), devices);
    assert_eq!(
        credentials.lines().next(),
        device_credentials(&["sensor-00".to_owned()]).lines().next()
    );
    let (azurite, broker) = tokio::join!(Azurite::start(), SecureMosquitto::start(&credentials));
    let names = Names::new();
    let storage = azurite.connection_string();
    let ingest_env = vec![
        ("MQTT_URL", broker.mtls_url()),
        ("MQTT_CA_FILE", broker.file("ca.crt").display().to_string()),
        (
            "MQTT_CLIENT_CERT",
            broker.file("ingest.crt").display().to_string(),
        ),
        (
            "MQTT_CLIENT_KEY",
            broker.file("ingest.key").display().to_string(),
        ),
        ("AZURE_STORAGE_CONNECTION_STRING", storage.clone()),
        ("INGEST_QUEUE_NAME", names.queue.clone()),
        ("INGEST_CLIENT_ID", unique("ingest")),
    ];
    let penv = names.processor_env(&storage);
    let (_ingest, _processor) = tokio::join!(
        Service::start("ingest", &ingest_env),
        Service::start("processor", &penv)
    );
    // Every simulated device connects as itself over TLS.
    let secret_file = broker.identities.0.join("fleet.secret");
    std::fs::write(&secret_file, FLEET_SECRET).unwrap();
    let out = tokio::process::Command::new(tests::services::bin_path("simulator"))
        .args([
            "--devices",
            &devices.to_string(),
            "--interval",
            "1s",
            "--rounds",
            "2",
        ])
        .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
        .env("MQTT_URL", broker.url())
        .env("MQTT_CA_FILE", broker.file("ca.crt"))
        .env("SIMULATOR_DEVICE_SECRET_FILE", &secret_file)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "simulator failed: {stderr}");
    assert!(!stderr.contains(FLEET_SECRET));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["connections"], devices as u64, "{summary}");
    assert_eq!(summary["acked"], summary["messages"], "{summary}");
    let expected = summary["expected_rows"].as_u64().unwrap() as usize;
    assert_eq!(expected, devices * 2);
    wait_rows(&azurite, &names.table, expected).await;

    // A device with a client certificate publishes as its certificate's name.
    let cert = client(
        &broker.mtls_url(),
        broker.file("ca.crt"),
        None,
        Some((
            broker.file("sensor-00001.crt"),
            broker.file("sensor-00001.key"),
        )),
    );
    let at = now_ms() - 5_000;
    assert_eq!(
        publish_one(
            &cert,
            &topic("sensor-00001"),
            reading("sensor-00001", at, 7)
        )
        .await
        .ok(),
        Some(PubAckReason::Success)
    );
    let forged = publish_one(
        &cert,
        &topic("sensor-00002"),
        reading("sensor-00002", at, 8),
    )
    .await;
    assert!(!matches!(forged, Ok(PubAckReason::Success)), "{forged:?}");
    wait_rows(&azurite, &names.table, expected + 1).await;
}

/// Runs a binary of the workspace to its end: whether it succeeded, and all it printed.
async fn run_tool(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = tokio::process::Command::new(tests::services::bin_path(bin))
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Each service's least privilege, as an account SAS: (services, resource types, permissions).
const INGEST_SAS: (&str, &str, &str) = ("q", "o", "a");
const PROCESSOR_SAS: (&str, &str, &str) = ("qt", "co", "rapu");
const ARCHIVER_SAS: (&str, &str, &str) = ("bt", "co", "rwd");
const DEADLETTER_SAS: (&str, &str, &str) = ("q", "co", "rapu");

/// The processor's environment on `storage`, plus `extra`.
fn processor_env_with(
    names: &Names,
    storage: &str,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut env = names.processor_env(storage);
    env.extend(extra.iter().cloned());
    env
}

fn sas(azurite: &Azurite, (ss, srt, sp): (&str, &str, &str), valid_for: Duration) -> String {
    let expiry = time::OffsetDateTime::now_utc() + valid_for;
    tests::storage::sas_connection_string(azurite, ss, srt, sp, expiry)
}

#[tokio::test]
async fn least_privilege_credentials_run_the_pipeline_a_403_loses_nothing_and_no_secret_leaks() {
    if !tests::servers_available("least_privilege") {
        return;
    }
    let ids = vec!["sensor-00001".to_owned()];
    let credentials = device_credentials(&ids);
    let (mut azurite, broker) =
        tokio::join!(Azurite::start(), SecureMosquitto::start(&credentials));
    let names = Names::new();
    let container = unique("archive");
    // The operator creates the resources; no service credential may.
    let admin = azurite.account();
    for q in [&names.queue, &names.dead] {
        admin.queue(q).create_if_missing().await.unwrap();
    }
    for t in [&names.table, &names.devices, schemas::rollup::DEFAULT_TABLE] {
        admin.table(t).create_if_missing().await.unwrap();
    }
    admin
        .container(&container)
        .create_if_missing()
        .await
        .unwrap();

    let day = Duration::from_secs(86_400);
    let ingest_sas = sas(&azurite, INGEST_SAS, day);
    // The processor's credential expires mid-run: every call after that is a 403.
    let short_sas = sas(&azurite, PROCESSOR_SAS, Duration::from_secs(25));
    let processor_sas = sas(&azurite, PROCESSOR_SAS, day);
    let archiver_sas = sas(&azurite, ARCHIVER_SAS, day);
    let deadletter_sas = sas(&azurite, DEADLETTER_SAS, day);
    let sas_of = |cs: &str| {
        infra::storage::Account::from_connection_string(cs, Duration::from_secs(10)).unwrap()
    };

    // Least means least: ingest's credential cannot read its own queue.
    let denied = sas_of(&ingest_sas)
        .queue(&names.queue)
        .get(1, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(denied.status(), Some(403), "{denied}");

    let ingest = Service::start("ingest", &ingest_env(&broker, &ingest_sas, &names.queue)).await;
    let penv = [
        ("PROCESSOR_MAX_DELIVERIES", "2".to_owned()),
        ("PROCESSOR_VISIBILITY_TIMEOUT", "6s".to_owned()),
        ("PROCESSOR_MAX_AGE", "60days".to_owned()),
    ];
    let mut processor =
        Service::start("processor", &processor_env_with(&names, &short_sas, &penv)).await;
    let sensor = device(&broker, "sensor-00001");

    // Before the expiry: readings stored (one 40 days old, for the archiver), one malformed
    // dead-lettered.
    let now = now_ms();
    let old_ms = now - 40 * 86_400_000;
    let mut first: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                topic("sensor-00001"),
                reading("sensor-00001", now - 100_000 + i, i as u64),
            )
        })
        .collect();
    first.push((topic("sensor-00001"), reading("sensor-00001", old_ms, 100)));
    first.push((topic("sensor-00001"), b"{not json".to_vec()));
    publish_with(&sensor, first).await;
    wait_rows(&azurite, &names.table, 21).await;
    let dl_queue = admin.queue(&names.dead);
    tests::wait_for("the first dead letter", Duration::from_secs(30), || async {
        (dl_queue.approximate_depth().await.ok()? >= 1).then_some(())
    })
    .await;

    // After the expiry: the processor is refused, holds everything, blames no reading.
    tokio::time::sleep(
        Duration::from_secs(26).saturating_sub(Duration::from_millis((now_ms() - now) as u64)),
    )
    .await;
    // Through the gateway identity, one reading each for 30 devices.
    let gateway = client(
        &broker.url(),
        broker.file("ca.crt"),
        Some(("gateway", &broker.password("gateway"))),
        None,
    );
    let second: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            let id = format!("gw-{i:02}");
            (topic(&id), reading(&id, now - 50_000 + i, 200 + i as u64))
        })
        .collect();
    publish_with(&gateway, second).await;
    let body = wait_not_ready(&processor, "403").await;
    let mut endpoint_bodies = vec![body];

    // A credential that may read the queue but not write rows (a rotation gone wrong; the
    // emulator lets it write transactions, so these are single-row writes): rounds fail on
    // every write, deliveries pile up past PROCESSOR_MAX_DELIVERIES, and still no reading is
    // dead-lettered or deleted.
    processor.kill9().await;
    // It may add queue messages (dead letters), so a 403 taken for bad data would show.
    let narrow_sas = sas(&azurite, ("qt", "co", "rap"), day);
    let mut narrow =
        Service::spawn("processor", &processor_env_with(&names, &narrow_sas, &penv)).await;
    let body = wait_not_ready(&narrow, "storage refuses the processor").await;
    assert!(body.contains("403"), "{body}");
    endpoint_bodies.push(body);
    tokio::time::sleep(Duration::from_secs(20)).await;
    endpoint_bodies.push(
        tests::services::http_get(narrow.metrics_port, "/metrics")
            .await
            .unwrap()
            .1,
    );
    assert_eq!(rows(&azurite, &names.table).await.len(), 21);
    assert_eq!(
        dl_queue.approximate_depth().await.unwrap(),
        1,
        "a 403 made dead letters"
    );
    assert!(admin.queue(&names.queue).approximate_depth().await.unwrap() > 0);
    narrow.kill9().await;
    let narrow_log = narrow.log_text();

    // Storage goes away for a moment while ingest writes: transport errors, not secrets.
    azurite.stop().await;
    publish_with(
        &sensor,
        vec![(
            topic("sensor-00001"),
            reading("sensor-00001", now - 10_000, 300),
        )],
    )
    .await;
    tests::wait_for(
        "ingest to meet the outage",
        Duration::from_secs(30),
        || async { (ingest.metric("ingest_queue_put_failures_total").await > 0.0).then_some(()) },
    )
    .await;
    endpoint_bodies.push(
        tests::services::http_get(ingest.metrics_port, "/readyz")
            .await
            .unwrap()
            .1,
    );
    azurite.restart().await;

    // The operator rotates the credential by restarting with a new one: everything arrives,
    // and the only dead letter is the malformed reading.
    processor.set_env("AZURE_STORAGE_CONNECTION_STRING", processor_sas.clone());
    processor.restart().await;
    assert!(
        narrow_log.contains("Storage refuses the processor"),
        "{narrow_log}"
    );
    wait_rows(&azurite, &names.table, 52).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(rows(&azurite, &names.table).await.len(), 52);
    endpoint_bodies.push(
        tests::services::http_get(processor.metrics_port, "/metrics")
            .await
            .unwrap()
            .1,
    );

    // The archiver and the dead-letter tool on their own least privilege.
    let (archived, archiver_out) = run_tool(
        "archiver",
        &["run", "--once"],
        &[
            ("AZURE_STORAGE_CONNECTION_STRING", archiver_sas.as_str()),
            ("ARCHIVER_TABLE_NAME", &names.table),
            ("ARCHIVER_DEVICE_TABLE", &names.devices),
            ("ARCHIVER_CONTAINER", &container),
            ("ARCHIVER_METRICS_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    assert!(archived, "{archiver_out}");
    assert_eq!(
        rows(&azurite, &names.table).await.len(),
        51,
        "the old reading left the table"
    );
    assert_eq!(admin.container(&container).list("").await.unwrap().len(), 1);
    let (listed, deadletter_out) = run_tool(
        "deadletter",
        &["list", "--json", "--queue", &names.dead, "--hold", "3s"],
        &[("AZURE_STORAGE_CONNECTION_STRING", deadletter_sas.as_str())],
    )
    .await;
    assert!(listed, "{deadletter_out}");
    assert!(
        deadletter_out.contains("malformed_json"),
        "{deadletter_out}"
    );

    // A malformed connection string holding a secret is refused by name, not by value.
    let malformed = format!(
        "AccountName=devstoreaccount1;{};Nonsense",
        processor_sas.split(';').nth(1).unwrap()
    );
    let (refused, refused_out) = run_tool(
        "processor",
        &[],
        &[
            ("AZURE_STORAGE_CONNECTION_STRING", malformed.as_str()),
            ("PROCESSOR_METRICS_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    assert!(!refused);
    assert!(
        refused_out.contains("part 3 is not Key=value"),
        "{refused_out}"
    );

    // No secret anywhere: logs at debug level too, endpoints, tool output.
    let mut wrong = ingest_env(&broker, &ingest_sas, &names.queue);
    wrong.push(("RUST_LOG", "debug".into()));
    wrong.retain(|(k, _)| *k != "MQTT_PASSWORD_FILE");
    wrong.push(("MQTT_PASSWORD", "wrong-password-secret".into()));
    let wrong = Service::spawn("ingest", &wrong).await;
    endpoint_bodies.push(wait_not_ready(&wrong, "refused").await);
    let help = std::process::Command::new(tests::services::bin_path("ingest"))
        .arg("--help")
        .env("MQTT_PASSWORD", "help-password-secret")
        .env("AZURE_STORAGE_CONNECTION_STRING", &ingest_sas)
        .output()
        .unwrap();
    let texts = [
        ingest.log_text(),
        processor.log_text(),
        narrow_log,
        wrong.log_text(),
        archiver_out,
        deadletter_out,
        refused_out,
        String::from_utf8_lossy(&help.stdout).into_owned(),
        endpoint_bodies.join("\n"),
    ];
    let mut secrets: Vec<String> = [
        &ingest_sas,
        &short_sas,
        &processor_sas,
        &archiver_sas,
        &deadletter_sas,
    ]
    .iter()
    .map(|cs| tests::storage::sas_signature(cs))
    .collect();
    secrets.extend(secrets.clone().iter().map(|s| {
        s.replace("%2B", "+")
            .replace("%2F", "/")
            .replace("%3D", "=")
    }));
    secrets.extend([
        broker.password("ingest"),
        broker.password("gateway"),
        infra::mqtt::device_password(&Secret::new(FLEET_SECRET), "sensor-00001")
            .expose()
            .to_owned(),
        "wrong-password-secret".into(),
        "help-password-secret".into(),
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq".into(),
    ]);
    assert!(
        texts[0].contains("queue_put failed"),
        "the scan must cover the outage's errors"
    );
    assert!(
        texts[1].contains("403") && texts[2].contains("403"),
        "the scan must cover the 403s"
    );
    for text in &texts {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a secret leaked:\n{text}");
        }
    }
}

#[tokio::test]
async fn without_create_rights_a_missing_queue_is_named_in_readiness_and_nothing_is_lost() {
    if !tests::servers_available("missing_queue") {
        return;
    }
    let (azurite, mosquitto) = tokio::join!(Azurite::start(), tests::Mosquitto::start());
    let queue = unique("ingest");
    let mut ingest = Service::spawn(
        "ingest",
        &[
            ("MQTT_URL", mosquitto.url()),
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                azurite.connection_string(),
            ),
            ("INGEST_QUEUE_NAME", queue.clone()),
            ("INGEST_CLIENT_ID", unique("ingest")),
            ("STORAGE_CREATE_MISSING", "false".into()),
        ],
    )
    .await;
    // Nothing is created or probed at start: ingest subscribes and is ready.
    tests::wait_for("ingest to be ready", Duration::from_secs(30), || async {
        (tests::services::http_get(ingest.metrics_port, "/readyz")
            .await?
            .0
            == 200)
            .then_some(())
    })
    .await;
    let at = now_ms() - 1_000;
    tests::storage::publish_all(
        mosquitto.port,
        vec![(topic("dev-q"), reading("dev-q", at, 1))],
    )
    .await;
    let body = wait_not_ready(&ingest, "QueueNotFound").await;
    assert!(body.contains(&queue), "{body}");
    assert!(!ingest.exited(), "ingest must keep running");
    assert_eq!(ingest.metric("ingest_messages_acked_total").await, 0.0);
    // The operator creates the queue: the held reading goes in, and ingest is ready again.
    let q = azurite.account().queue(&queue);
    q.create_if_missing().await.unwrap();
    tests::wait_for(
        "the reading in the queue",
        Duration::from_secs(30),
        || async { (q.approximate_depth().await.ok()? == 1).then_some(()) },
    )
    .await;
    tests::wait_for(
        "ingest to be ready again",
        Duration::from_secs(30),
        || async {
            (tests::services::http_get(ingest.metrics_port, "/readyz")
                .await?
                .0
                == 200)
                .then_some(())
        },
    )
    .await;
    assert_eq!(ingest.metric("ingest_messages_acked_total").await, 1.0);
}

/// An Entra ID access token as Azurite's OAuth mode checks it (audience, issuer, lifetime;
/// not the signature).
fn fake_entra_token() -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = now_ms() / 1000;
    let payload = serde_json::json!({
        "aud": "https://storage.azure.com",
        "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
        "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
    });
    format!(
        "{}.{}.c2ln",
        b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64.encode(payload.to_string())
    )
}

/// A stand-in for the Entra ID token endpoint, over https with `cert` and `key` (PEM files; the
/// official credentials refuse an http authority): answers a managed identity's `GET /msi/`
/// with `msi`, anything else (the Entra ID token endpoint) with `oauth`, and keeps the
/// requests.
async fn token_endpoint(
    oauth: String,
    msi: String,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut stream) = acceptor.accept(stream).await else {
                continue;
            };
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as much body as Content-Length says.
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        keep.lock().unwrap().push(text.into_owned());
                        break;
                    }
                }
            }
            let answer = if raw.starts_with(b"GET /msi/") {
                &msi
            } else {
                &oauth
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (port, seen)
}

#[tokio::test]
async fn entra_id_tokens_from_the_azure_cli_and_workload_identity_reach_storage_with_no_key() {
    if !tests::servers_available("entra_id") {
        return;
    }
    // Certificates for Azurite's HTTPS, from the shipped script.
    let dir = tests::TempDir::new("entra");
    let made = std::process::Command::new("bash")
        .arg(tests::repo_root().join("deploy/mosquitto/gen-identities.sh"))
        .arg(dir.0.join("tls"))
        .output()
        .unwrap();
    assert!(made.status.success());
    let tls = |f: &str| dir.0.join("tls").join(f);
    let ca = tls("ca.crt");
    let (azurite, mosquitto) = tokio::join!(
        Azurite::start_oauth(tls("server.crt"), tls("server.key"), &ca),
        tests::Mosquitto::start()
    );
    let token = fake_entra_token();
    let names = Names::new();
    let endpoints = format!("AccountName=devstoreaccount1;{}", azurite.endpoints());

    // ingest: the Azure CLI, here a stand-in `az` that prints what `az account
    // get-access-token` prints.
    let bin = dir.0.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let answer = dir.0.join("az-answer.json");
    std::fs::write(
        &answer,
        serde_json::json!({
            "accessToken": token, "expires_on": now_ms() / 1000 + 3600,
            "subscription": "s", "tenant": "t", "tokenType": "Bearer",
        })
        .to_string(),
    )
    .unwrap();
    let az = bin.join("az");
    std::fs::write(
        &az,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = \"account get-access-token\" ] || exit 2\ncat {}\n",
            answer.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&az)
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ingest = Service::start(
        "ingest",
        &[
            ("MQTT_URL", mosquitto.url()),
            ("AZURE_STORAGE_AUTH", "azure-cli".into()),
            ("AZURE_STORAGE_CONNECTION_STRING", endpoints.clone()),
            ("AZURE_STORAGE_CA_FILE", tls("ca.crt").display().to_string()),
            ("PATH", path),
            ("INGEST_QUEUE_NAME", names.queue.clone()),
            ("INGEST_CLIENT_ID", unique("ingest")),
        ],
    )
    .await;

    // processor: workload identity, against a stand-in token endpoint.
    let answer =
        serde_json::json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"});
    // App Service's managed identity answers with `expires_on`, in Unix seconds as a string.
    let msi = serde_json::json!({
        "access_token": token, "expires_on": (now_ms() / 1000 + 3600).to_string(),
        "resource": "https://storage.azure.com", "token_type": "Bearer",
    });
    let (port, requests) = token_endpoint(
        answer.to_string(),
        msi.to_string(),
        &tls("server.crt"),
        &tls("server.key"),
    )
    .await;
    let federated = dir.0.join("federated-token");
    std::fs::write(&federated, "federated-assertion-1").unwrap();
    let mut penv = names.processor_env(&endpoints);
    penv.extend([
        ("AZURE_STORAGE_AUTH", "workload-identity".to_owned()),
        ("AZURE_STORAGE_CA_FILE", tls("ca.crt").display().to_string()),
        ("AZURE_TENANT_ID", "tenant-1".to_owned()),
        ("AZURE_CLIENT_ID", "client-1".to_owned()),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            federated.display().to_string(),
        ),
        ("AZURE_AUTHORITY_HOST", format!("https://127.0.0.1:{port}")),
    ]);
    let processor = Service::start("processor", &penv).await;

    let at = now_ms() - 10_000;
    let readings = (0..5)
        .map(|i| (topic("dev-e"), reading("dev-e", at + i, i as u64)))
        .collect();
    tests::storage::publish_all(mosquitto.port, readings).await;
    let stored = tests::wait_for(
        "rows written with Entra ID tokens",
        Duration::from_secs(60),
        || async {
            let rows = tests::storage::rows(&azurite.account(), &names.table)
                .await
                .ok()?;
            (rows.len() == 5).then_some(rows)
        },
    )
    .await;
    assert_eq!(stored[0]["PartitionKey"], "dev-e");
    let sent = requests.lock().unwrap().clone();
    assert!(!sent.is_empty(), "the processor never asked for a token");
    assert!(
        sent[0].contains("client_assertion=federated-assertion-1")
            && sent[0].contains("client_id=client-1")
            && sent[0].contains("scope=https%3A%2F%2Fstorage.azure.com%2F.default"),
        "{sent:?}"
    );
    // deadletter: a managed identity (the App Service / Container Apps style endpoint).
    let ca = ca.display().to_string();
    let identity_endpoint = format!("https://127.0.0.1:{port}/msi/token");
    let (listed, listed_out) = run_tool(
        "deadletter",
        &["list", "--json", "--queue", &names.dead, "--hold", "3s"],
        &[
            ("AZURE_STORAGE_AUTH", "managed-identity"),
            ("AZURE_STORAGE_CONNECTION_STRING", endpoints.as_str()),
            ("AZURE_STORAGE_CA_FILE", ca.as_str()),
            ("IDENTITY_ENDPOINT", identity_endpoint.as_str()),
            ("IDENTITY_HEADER", "header-1"),
        ],
    )
    .await;
    assert!(listed, "{listed_out}");
    let sent = requests.lock().unwrap().clone();
    assert!(
        sent.iter().any(|r| r.starts_with("GET /msi/token?")
            && r.to_ascii_lowercase()
                .contains("x-identity-header: header-1")),
        "the managed identity never asked its endpoint: {sent:?}"
    );
    for text in [ingest.log_text(), processor.log_text(), listed_out] {
        assert!(!text.contains(&token), "a token leaked");
        assert!(!text.contains("federated-assertion"), "an assertion leaked");
    }
}
