//! The Kubernetes manifests (`deploy/k8s`), validated offline: every overlay renders with
//! each kubectl at hand (Debian's 1.20, whose kustomize is v2, and a newer one on the PATH)
//! to the same objects; every object passes strict schema validation for Kubernetes 1.30 and
//! 1.37 (KEDA's kinds against tests/k8s/keda.schema.json); and the objects hold together:
//! every environment variable is one the service reads and every value parses as its flag,
//! every pod is locked down and probed, grace periods outlast the services' own, and the
//! processor has at most one autoscaler; a sharded overlay runs a processor, an archiver and a
//! dead-letter tool for each account of its shards file.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every directory under deploy/k8s that is deployed as is.
const OVERLAYS: [&str; 6] = [
    "local",
    "local-keda",
    "azure",
    "azure-keda",
    "azure-hpa",
    "azure-sharded",
];
/// The oldest and newest Kubernetes the objects must be valid for.
const KUBERNETES: [&str; 2] = ["1.30.0", "1.37.0"];

/// The kubectl binaries that can render a kustomization: Debian's (extracted by
/// `scripts/prereqs.sh --test`) and any on the PATH.
fn renderers() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let extracted = tests::repo_root().join(".tools/kubectl/usr/bin/kubectl");
    for candidate in [extracted, PathBuf::from("kubectl")] {
        let works = Command::new(&candidate)
            .args(["kustomize", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            found.push(candidate);
        }
    }
    found
}

/// The Python that has kubernetes-validate (`scripts/prereqs.sh --test` installs it).
fn validator() -> Option<PathBuf> {
    let python = tests::repo_root().join(".tools/py/bin/python");
    Command::new(&python)
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(python)
}

/// The objects, by renderer, by overlay.
type Rendered = Vec<BTreeMap<String, Vec<Value>>>;

/// Every overlay rendered with every renderer and validated, once for all the tests.
fn rendered() -> Option<&'static Rendered> {
    static RENDERED: std::sync::OnceLock<Option<Rendered>> = std::sync::OnceLock::new();
    RENDERED.get_or_init(render_and_validate).as_ref()
}

fn render_and_validate() -> Option<Rendered> {
    let renderers = renderers();
    let (false, Some(python)) = (renderers.is_empty(), validator()) else {
        tests::skip_missing(
            "the Kubernetes manifests' checks",
            "kubectl and kubernetes-validate (scripts/prereqs.sh --test installs them)",
        );
        return None;
    };
    let root = tests::repo_root();
    let dir = tests::TempDir::new("k8s");
    let mut files = Vec::new();
    for (r, kubectl) in renderers.iter().enumerate() {
        for overlay in OVERLAYS {
            let out = Command::new(kubectl)
                .arg("kustomize")
                .arg(root.join("deploy/k8s").join(overlay))
                .output()
                .expect("run kubectl kustomize");
            assert!(
                out.status.success(),
                "{} kustomize {overlay}: {}",
                kubectl.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let file = dir.0.join(format!("{r}-{overlay}.yaml"));
            std::fs::write(&file, &out.stdout).expect("write the rendered objects");
            files.push((r, overlay, file));
        }
    }
    let mut cmd = Command::new(python);
    cmd.arg(root.join("tests/k8s/validate.py"));
    for version in KUBERNETES {
        cmd.args(["--kubernetes-version", version]);
    }
    let out = cmd
        .args(files.iter().map(|(_, _, f)| f))
        .output()
        .expect("run validate.py");
    assert!(
        out.status.success(),
        "schema validation failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_file: BTreeMap<String, Vec<Value>> =
        serde_json::from_slice(&out.stdout).expect("validate.py prints JSON");
    let mut result = vec![BTreeMap::new(); renderers.len()];
    for (r, overlay, file) in files {
        let objects = by_file
            .remove(file.to_str().expect("UTF-8 path"))
            .expect("validated");
        result[r].insert(overlay.to_owned(), objects);
    }
    Some(result)
}

/// `name` without the content hash kustomize appends to a generated ConfigMap's name.
fn unhashed(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((base, hash))
            if hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            base
        }
        _ => name,
    }
}

/// The objects with generated names unhashed (kustomize v2 and v5 hash differently) and no
/// empty labels or annotations (v2 writes them on merged ConfigMaps), in a stable order.
fn normalized(objects: &[Value]) -> Vec<String> {
    let mut text = serde_json::to_string(objects).expect("JSON");
    for o in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        let name = o["metadata"]["name"].as_str().expect("name");
        text = text.replace(&format!("\"{name}\""), &format!("\"{}\"", unhashed(name)));
    }
    let mut objects: Vec<Value> = serde_json::from_str(&text).expect("JSON");
    for o in &mut objects {
        if let Some(meta) = o["metadata"].as_object_mut() {
            meta.retain(|_, v| v.as_object().is_none_or(|m| !m.is_empty()));
        }
    }
    let mut out: Vec<String> = objects.iter().map(Value::to_string).collect();
    out.sort();
    out
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// A ConfigMap kustomize generated, by its name before the content hash.
fn generated<'a>(objects: &'a [Value], name: &str) -> Option<&'a Value> {
    objects.iter().find(|o| {
        o["kind"] == "ConfigMap" && unhashed(o["metadata"]["name"].as_str().unwrap_or("")) == name
    })
}

/// The workloads: ("Kind/name", the Deployment or StatefulSet).
fn workloads(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
        .map(|o| {
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or(""),
                    o["metadata"]["name"].as_str().unwrap_or("")
                ),
                o,
            )
        })
        .collect()
}

/// The pipeline's own containers (its image): (workload, its object, container).
fn ours(objects: &[Value]) -> Vec<(String, &Value, &Value)> {
    workloads(objects)
        .into_iter()
        .flat_map(|(name, w)| {
            w["spec"]["template"]["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |c| (name.clone(), w, c))
        })
        .filter(|(_, _, c)| {
            c["image"]
                .as_str()
                .is_some_and(|i| i.contains("telemetry-pipeline"))
        })
        .collect()
}

/// A container's environment: its own `env` (a field reference stands for a pod name) and
/// every ConfigMap and Secret it takes whole.
fn environment(objects: &[Value], c: &Value) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), _) => v.clone(),
            (_, Value::String(path)) if path == "metadata.name" => "ingest-0".to_owned(),
            _ => panic!("{name}: only literal values and the pod name are checked"),
        };
        env.push((name, value));
    }
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let (kind, source) = if from["configMapRef"].is_object() {
            ("ConfigMap", &from["configMapRef"])
        } else {
            ("Secret", &from["secretRef"])
        };
        let name = source["name"].as_str().expect("envFrom name");
        let Some(object) = named(objects, kind, name) else {
            assert_eq!(source["optional"], true, "{kind} {name} is missing");
            continue;
        };
        for (k, v) in object["data"]
            .as_object()
            .into_iter()
            .chain(object["stringData"].as_object())
            .flatten()
        {
            let v = v.as_str().expect("string data");
            let v = if object["data"].get(k).is_some() && kind == "Secret" {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .expect("base64 secret data");
                String::from_utf8(bytes).expect("UTF-8 secret")
            } else {
                v.to_owned()
            };
            env.push((k.clone(), v));
        }
    }
    env
}

/// The problems with running `binary` (with container `args`) in `env`: a variable it does not
/// read, a value its flag refuses, a combination it refuses.
fn flag_problems<T: clap::Parser>(args: &[String], env: &[(String, String)]) -> Vec<String> {
    let command = T::command();
    let sub = args
        .first()
        .and_then(|a| command.find_subcommand(a).cloned());
    let mut top = Vec::new();
    let mut under = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in env {
        // Read by the tracing filter, not a flag.
        if name == "RUST_LOG" {
            continue;
        }
        let find = |c: &clap::Command| {
            c.get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .cloned()
        };
        let (arg, list) = match (find(&command), sub.as_ref().and_then(find)) {
            (Some(a), _) => (a, &mut top),
            (None, Some(a)) => (a, &mut under),
            (None, None) => {
                // A setting of a subcommand the tool is run with by hand (the dead-letter
                // toolbox): its value must parse there.
                let owner = command
                    .get_subcommands()
                    .find_map(|s| find(s).map(|a| (s.get_name().to_owned(), a)));
                match owner {
                    Some((subcommand, arg)) if sub.is_none() => {
                        let long = arg.get_long().expect("every env flag has a long name");
                        let argv = [
                            command.get_name().to_owned(),
                            subcommand,
                            format!("--{long}={value}"),
                        ];
                        if let Err(e) = T::try_parse_from(&argv) {
                            if !missing_only(&e) {
                                problems.push(format!("{}: {e}", argv.join(" ")));
                            }
                        }
                    }
                    _ => problems.push(format!("{name}: not a setting of {}", command.get_name())),
                }
                continue;
            }
        };
        let long = arg.get_long().expect("every env flag has a long name");
        if arg.get_action().takes_values() {
            list.push(format!("--{long}={value}"));
        } else if value.parse::<bool>().expect("a boolean switch") {
            list.push(format!("--{long}"));
        }
    }
    let mut argv = vec![command.get_name().to_owned()];
    argv.extend(top);
    argv.extend(args.iter().cloned());
    argv.extend(under);
    if let Err(e) = T::try_parse_from(&argv) {
        // The toolbox runs no command of its own: its subcommand comes with `kubectl exec`.
        if !(missing_only(&e) && sub.is_none() && command.has_subcommands()) {
            problems.push(format!("{}: {e}", argv.join(" ")));
        }
    }
    problems
}

/// Whether `e` only says that something the command line must name is absent (a subcommand,
/// or its arguments), which `kubectl exec` gives the toolbox.
fn missing_only(e: &clap::Error) -> bool {
    use clap::error::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::MissingRequiredArgument
            | ErrorKind::MissingSubcommand
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

/// The seconds a container's preStop hook sleeps (0 without one).
fn prestop_secs(c: &Value) -> u64 {
    match c["lifecycle"]["preStop"]["exec"]["command"].as_array() {
        Some(cmd) if cmd.first().is_some_and(|s| s == "sleep") => cmd[1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("sleep seconds"),
        Some(other) => panic!("unknown preStop {other:?}"),
        None => 0,
    }
}

/// The binary a container runs: its command, or for a container that only waits (the
/// dead-letter toolbox), the tool it is named after.
fn binary(c: &Value) -> (String, Vec<String>) {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().expect("string").to_owned())
            .collect()
    };
    let command = strings(&c["command"]);
    let mut args = strings(&c["args"]);
    let (bin, rest) = command
        .split_first()
        .expect("every container names its command");
    if bin == "sleep" {
        return (c["name"].as_str().expect("name").to_owned(), Vec::new());
    }
    let mut all = rest.to_vec();
    all.append(&mut args);
    (bin.clone(), all)
}

#[test]
fn every_overlay_renders_alike_with_each_kubectl_and_passes_the_schemas() {
    let Some(rendered) = rendered() else {
        return;
    };
    if rendered.len() < 2 {
        eprintln!("k8s: one kubectl only (Debian's): nothing to compare its rendering with");
    }
    for overlay in OVERLAYS {
        let first = normalized(&rendered[0][overlay]);
        assert!(first.len() > 20, "{overlay}: too few objects");
        for other in &rendered[1..] {
            let other = normalized(&other[overlay]);
            let differ = first.iter().zip(&other).find(|(a, b)| a != b);
            assert!(
                first.len() == other.len() && differ.is_none(),
                "{overlay}: the kubectls render different objects: {differ:#?}"
            );
        }
    }
}

#[test]
fn every_variable_the_manifests_set_is_a_setting_and_parses() {
    let Some(rendered) = rendered() else {
        return;
    };
    let mut checked = 0;
    for (overlay, objects) in rendered[0].iter() {
        for (workload, _, c) in ours(objects) {
            let env = environment(objects, c);
            let (bin, args) = binary(c);
            let problems = match bin.as_str() {
                "ingest" => flag_problems::<ingest::Config>(&args, &env),
                "processor" => flag_problems::<processor::Config>(&args, &env),
                "archiver" => flag_problems::<archiver::Config>(&args, &env),
                "dashboard" => flag_problems::<dashboard::Config>(&args, &env),
                "simulator" => flag_problems::<simulator::Config>(&args, &env),
                "deadletter" => flag_problems::<deadletter::Cli>(&args, &env),
                other => vec![format!("runs {other}, which is not one of the binaries")],
            };
            assert!(problems.is_empty(), "{overlay} {workload}: {problems:#?}");
            // A file a setting names is mounted (a secret), and read-only.
            for (name, path) in env.iter().filter(|(k, _)| k.ends_with("_FILE")) {
                let mounted = c["volumeMounts"].as_array().into_iter().flatten().any(|m| {
                    m["readOnly"] == true
                        && m["mountPath"]
                            .as_str()
                            .is_some_and(|dir| path.starts_with(&format!("{dir}/")))
                });
                assert!(
                    mounted,
                    "{overlay} {workload}: {name}={path} is not on a read-only mount"
                );
            }
            // The storage account a connection string names is one the services can use.
            for (_, value) in env
                .iter()
                .filter(|(k, _)| k == "AZURE_STORAGE_CONNECTION_STRING")
            {
                #[derive(clap::Parser)]
                struct Storage {
                    #[command(flatten)]
                    storage: infra::cli::StorageArgs,
                }
                let args = <Storage as clap::Parser>::parse_from([
                    "storage",
                    &format!("--storage-connection-string={value}"),
                ]);
                if let Err(e) = args.storage.account(infra::storage::Grant::ALL) {
                    panic!("{overlay} {workload}: the connection string is refused: {e}");
                }
            }
            checked += env.len();
        }
    }
    assert!(checked > 50, "too few variables checked: {checked}");
}

#[test]
fn every_pod_is_locked_down_probed_sized_and_given_time_to_flush() {
    let Some(rendered) = rendered() else {
        return;
    };
    for (overlay, objects) in rendered[0].iter() {
        for (workload, w) in workloads(objects) {
            let spec = &w["spec"]["template"]["spec"];
            let at = format!("{overlay} {workload}");
            assert_eq!(
                spec["automountServiceAccountToken"], false,
                "{at}: API token mounted"
            );
            assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{at}");
            assert_eq!(
                spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{at}"
            );
            for c in spec["containers"].as_array().expect("containers") {
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{at}"
                );
                for bound in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            c["resources"][bound][resource].is_string(),
                            "{at}: no {resource} {bound}"
                        );
                    }
                }
            }
        }
        for (workload, w, c) in ours(objects) {
            let at = format!("{overlay} {workload}");
            let (bin, _) = binary(c);
            // The toolbox only waits for `kubectl exec`; it serves nothing to probe.
            if bin == "deadletter" || bin == "simulator" {
                continue;
            }
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{at}");
            // A busy pod answers late; a 1 s probe would restart it for being busy.
            assert!(
                c["livenessProbe"]["timeoutSeconds"].as_u64() >= Some(5),
                "{at}"
            );
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{at}");
            let env: BTreeMap<String, String> = environment(objects, c).into_iter().collect();
            // How long each service may take to flush after SIGTERM, from its own code.
            let secs = |name: &str| {
                humantime::parse_duration(&env[name])
                    .expect("a duration")
                    .as_secs()
            };
            let flush = match bin.as_str() {
                "ingest" => ingest::MAX_SHUTDOWN.as_secs(),
                // Messages settle by 7/8 of the visibility timeout; the devices' latest
                // states take a few seconds more (10 s per 100 devices at most).
                "processor" => secs("PROCESSOR_VISIBILITY_TIMEOUT") + 10,
                // The device-days in progress: storage requests, each bounded by its timeout.
                "archiver" => secs("STORAGE_TIMEOUT"),
                // Requests in progress, after the preStop pause.
                "dashboard" => dashboard::SHUTDOWN_GRACE.as_secs() + prestop_secs(c),
                other => panic!("{at}: no flush time known for {other}"),
            };
            let template = &w["spec"]["template"];
            let grace = template["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30);
            assert!(
                grace > flush,
                "{at}: {grace} s of grace for {flush} s of flushing"
            );
            // Prometheus scrapes the port the service serves its metrics on.
            let port: u64 = template["metadata"]["annotations"]["prometheus.io/port"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{at}: no scrape port"));
            assert!(
                c["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["containerPort"] == port),
                "{at}: scrapes {port}, which it does not serve"
            );
        }
    }
}

/// The storage account a workload's pods use: `AZURE_STORAGE_ACCOUNT` of the ConfigMaps it
/// takes whole.
fn account_of<'a>(objects: &'a [Value], workload: &Value) -> Option<&'a Value> {
    workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|from| from["configMapRef"]["name"].as_str())
        .filter_map(|name| named(objects, "ConfigMap", name))
        .find_map(|cm| cm["data"].get("AZURE_STORAGE_ACCOUNT"))
}

/// Whether a selector's labels are all among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn every_processor_has_one_autoscaler_at_most_and_replicas_have_budgets() {
    let Some(rendered) = rendered() else {
        return;
    };
    for (overlay, objects) in rendered[0].iter() {
        let processors: Vec<&Value> = objects
            .iter()
            .filter(|o| {
                o["kind"] == "Deployment"
                    && o["metadata"]["labels"]["app.kubernetes.io/name"] == "processor"
            })
            .collect();
        assert!(!processors.is_empty(), "{overlay}: no processor");
        let mut autoscaled = BTreeSet::new();
        for processor in &processors {
            let name = processor["metadata"]["name"].as_str().expect("a name");
            let scalers: Vec<&str> = objects
                .iter()
                .filter(|o| {
                    (o["kind"] == "ScaledObject" || o["kind"] == "HorizontalPodAutoscaler")
                        && o["spec"]["scaleTargetRef"]["name"] == name
                })
                .map(|o| o["kind"].as_str().unwrap_or(""))
                .collect();
            let expected: &[&str] = if overlay.ends_with("-keda") || overlay.ends_with("-sharded") {
                &["ScaledObject"]
            } else if overlay.ends_with("-hpa") {
                &["HorizontalPodAutoscaler"]
            } else {
                &[]
            };
            assert_eq!(scalers, expected, "{overlay} {name}");
            if !scalers.is_empty() {
                autoscaled.insert(name);
            }
            // The autoscaler owns the processor's replicas: a count in the manifest would
            // reset them at every apply.
            assert!(
                processor["spec"]["replicas"].is_null(),
                "{overlay}: {name} replicas set"
            );
        }
        // A ScaledObject's queue is the one ingest fills, in the account its processor uses,
        // and its authentication exists.
        for so in objects.iter().filter(|o| o["kind"] == "ScaledObject") {
            let at = format!("{overlay} {}", so["metadata"]["name"]);
            let queue = &so["spec"]["triggers"][0]["metadata"]["queueName"];
            let settings = generated(objects, "ingest").expect("ingest's settings");
            assert_eq!(*queue, settings["data"]["INGEST_QUEUE_NAME"], "{at}");
            let auth = so["spec"]["triggers"][0]["authenticationRef"]["name"]
                .as_str()
                .expect("authenticationRef");
            assert!(
                named(objects, "TriggerAuthentication", auth).is_some(),
                "{at}"
            );
            // With workload identity the trigger names the account the services use.
            if let Some(account) = so["spec"]["triggers"][0]["metadata"].get("accountName") {
                let target = so["spec"]["scaleTargetRef"]["name"]
                    .as_str()
                    .expect("target");
                let processor = named(objects, "Deployment", target).expect("its processor");
                assert_eq!(
                    Some(account),
                    account_of(objects, processor),
                    "{at}: KEDA watches another account than its processor uses"
                );
            }
        }
        // Sharded: every account of the shards file has its own processor, archiver and
        // dead-letter tool, labelled with its place in the file, and no other runs.
        if let Some(shards) = generated(objects, "shards") {
            let accounts: Vec<&str> = shards["data"]["accounts"]
                .as_str()
                .expect("the shards file")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect();
            assert!(accounts.len() > 1, "{overlay}: one shard");
            for service in ["processor", "archiver", "deadletter"] {
                let mut found: Vec<(String, String)> = objects
                    .iter()
                    .filter(|o| {
                        o["kind"] == "Deployment"
                            && o["metadata"]["labels"]["app.kubernetes.io/name"] == service
                    })
                    .map(|o| {
                        let labels = &o["spec"]["template"]["metadata"]["labels"];
                        (
                            labels["app.kubernetes.io/instance"]
                                .as_str()
                                .unwrap_or("unlabelled")
                                .to_owned(),
                            account_of(objects, o)
                                .and_then(Value::as_str)
                                .unwrap_or("none")
                                .to_owned(),
                        )
                    })
                    .collect();
                found.sort();
                let expected: Vec<(String, String)> = accounts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("shard-{i}"), (*a).to_owned()))
                    .collect();
                assert_eq!(found, expected, "{overlay}: {service} by shard");
            }
        }
        // Workloads select only their own pods: two Deployments never select each other's.
        let all = workloads(objects);
        for (name, w) in &all {
            for (other, o) in &all {
                if name != other {
                    assert!(
                        !selects(
                            &w["spec"]["selector"]["matchLabels"],
                            &o["spec"]["template"]["metadata"]["labels"]
                        ),
                        "{overlay}: {name} selects {other}'s pods"
                    );
                }
            }
        }
        // Every workload of several replicas (or autoscaled) has a disruption budget.
        let budgets: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "PodDisruptionBudget")
            .map(|o| &o["spec"]["selector"]["matchLabels"])
            .collect();
        for (name, o) in &all {
            let own = o["metadata"]["name"].as_str().unwrap_or("");
            let scaled =
                o["spec"]["replicas"].as_u64().unwrap_or(1) > 1 || autoscaled.contains(own);
            if scaled
                && o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "telemetry-pipeline"
            {
                let labels = &o["spec"]["template"]["metadata"]["labels"];
                assert!(
                    budgets.iter().any(|b| selects(b, labels)),
                    "{overlay}: {name} has no PodDisruptionBudget"
                );
            }
        }
    }
}

/// A Mosquitto configuration's settings, without comments and blank lines.
fn directives(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("mosquitto.conf")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_local_clusters_broker_keeps_the_loss_free_configuration() {
    let root = tests::repo_root();
    let shipped = directives(&root.join("deploy/mosquitto.conf"));
    assert!(shipped.iter().any(|d| d == "max_queued_messages 0"));
    assert_eq!(
        shipped,
        directives(&root.join("deploy/k8s/local/mosquitto.conf"))
    );
}
