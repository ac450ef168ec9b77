//! Admission against a real kube-apiserver: applies the CRD with server-side apply and checks
//! that invalid BftClusters are rejected with the messages the CEL rules promise. Skipped unless
//! KUBECONFIG is set (the test bed, or kind in users' CI). Uses the namespace in
//! KMMR_TEST_NAMESPACE, or `default`.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmmr_crds::BftCluster;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::Status;
use kube::Client;
use serde_json::{json, Value};

const MANAGER: &str = "kmmr-crds-test";

async fn client_or_skip() -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set");
        return None;
    }
    Some(
        Client::try_default()
            .await
            .expect("a client from KUBECONFIG"),
    )
}

async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = kmmr_crds::crd();
    let name = crd.metadata.name.clone().expect("the CRD has a name");
    crds.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("server-side apply of the CRD");
    for _ in 0..60 {
        let crd = crds.get(&name).await.expect("read back the CRD");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            // The apiserver serves a new CRD a moment after Established.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the CRD {name} did not become Established within 30 s");
}

fn api(client: &Client) -> Api<BftCluster> {
    let ns = std::env::var("KMMR_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    Api::namespaced(client.clone(), &ns)
}

fn cluster(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "kmmr.io/v1alpha1",
        "kind": "BftCluster",
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// Applies `obj` (server-side apply, dry run) and returns the apiserver's rejection.
async fn rejection(api: &Api<BftCluster>, name: &str, obj: Value, pp: PatchParams) -> Status {
    match api.patch(name, &pp.dry_run(), &Patch::Apply(&obj)).await {
        Ok(_) => panic!("the apiserver accepted an invalid BftCluster: {obj}"),
        Err(kube::Error::Api(status)) => *status,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// The message of a 422 Invalid, which is how schema and CEL violations come back.
async fn invalid(api: &Api<BftCluster>, name: &str, obj: Value) -> String {
    let status = rejection(
        api,
        name,
        obj,
        PatchParams::apply(MANAGER).validation_strict(),
    )
    .await;
    assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
    status.message
}

#[tokio::test]
async fn apiserver_rejects_invalid_bftclusters_with_the_cel_messages() {
    let Some(client) = client_or_skip().await else {
        return;
    };
    install_crd(&client).await;
    let api = api(&client);
    let image = "kmmr/replica:0.1.0";

    // A minimal valid manifest is accepted, and the apiserver fills in the schema defaults.
    let ok = api
        .patch(
            "crd-test-valid",
            &PatchParams::apply(MANAGER).dry_run().validation_strict(),
            &Patch::Apply(cluster(
                "crd-test-valid",
                json!({ "replicas": 4, "image": image }),
            )),
        )
        .await
        .expect("a minimal BftCluster is valid");
    assert_eq!(ok.spec.ports.replica, 7000);
    assert_eq!(ok.spec.storage.size.0, "1Gi");

    let msg = invalid(
        &api,
        "crd-test-three",
        cluster("crd-test-three", json!({ "replicas": 3, "image": image })),
    )
    .await;
    assert!(
        msg.contains("spec.replicas must be at least 4: BFT needs n >= 3f+1 with f >= 1"),
        "{msg}"
    );

    let msg = invalid(
        &api,
        "crd-test-f",
        cluster(
            "crd-test-f",
            json!({ "replicas": 6, "f": 2, "image": image }),
        ),
    )
    .await;
    assert!(
        msg.contains("spec.f must be at least 1 and spec.replicas must be at least 3*spec.f+1"),
        "{msg}"
    );

    let msg = invalid(
        &api,
        "crd-test-schedule",
        cluster(
            "crd-test-schedule",
            json!({ "replicas": 4, "image": image, "backup": { "claimName": "b", "schedule": "every day" } }),
        ),
    )
    .await;
    assert!(
        msg.contains("spec.backup.schedule must be a cron schedule of 5 fields"),
        "{msg}"
    );
    let msg = invalid(
        &api,
        "crd-test-restore",
        cluster(
            "crd-test-restore",
            json!({ "replicas": 4, "image": image, "restoreFrom": { "claimName": "b", "file": "../x.kmmr" } }),
        ),
    )
    .await;
    assert!(
        msg.contains("spec.restoreFrom.file must be a path relative to the claim's root"),
        "{msg}"
    );
    let s3 = json!({ "bucket": "kmmr-backups", "credentialsSecret": "s3-creds" });
    for (name, backup, says) in [
        (
            "crd-test-two-places",
            json!({ "claimName": "b", "s3": s3 }),
            "spec.backup needs exactly one place for backups",
        ),
        (
            "crd-test-no-place",
            json!({ "keep": 3 }),
            "spec.backup needs exactly one place for backups",
        ),
        (
            "crd-test-bucket",
            json!({ "s3": { "bucket": "Not_A_Bucket", "credentialsSecret": "s" } }),
            "s3.bucket must be an S3 bucket name",
        ),
        (
            "crd-test-endpoint",
            json!({ "s3": { "bucket": "kmmr-backups", "credentialsSecret": "s", "endpoint": "minio:9000/x" } }),
            "s3.endpoint must be a URL",
        ),
    ] {
        let msg = invalid(
            &api,
            name,
            cluster(
                name,
                json!({ "replicas": 4, "image": image, "backup": backup }),
            ),
        )
        .await;
        assert!(msg.contains(says), "{name}: {msg}");
    }
    let msg = invalid(
        &api,
        "crd-test-restore-two",
        cluster(
            "crd-test-restore-two",
            json!({ "replicas": 4, "image": image, "restoreFrom": { "claimName": "b", "file": "x.kmmr", "s3": { "bucket": "kmmr-backups", "key": "x.kmmr", "credentialsSecret": "s" } } }),
        ),
    )
    .await;
    assert!(
        msg.contains("spec.restoreFrom needs exactly one backup"),
        "{msg}"
    );

    let long = "a".repeat(41);
    let msg = invalid(
        &api,
        &long,
        cluster(&long, json!({ "replicas": 4, "image": image })),
    )
    .await;
    assert!(
        msg.contains("metadata.name must be at most 40 characters"),
        "{msg}"
    );

    // Server-side apply refuses fields the schema does not declare whatever the field
    // validation directive: kube-apiserver 1.34 answers 500 "field not declared in schema" while
    // building the typed patch, before validation. kubectl apply (strict by default) rejects
    // them too; only a non-strict create or update would prune them silently.
    for pp in [
        PatchParams::apply(MANAGER).validation_strict(),
        PatchParams::apply(MANAGER),
    ] {
        let status = rejection(
            &api,
            "crd-test-unknown",
            cluster(
                "crd-test-unknown",
                json!({ "replicas": 4, "image": image, "replicaz": 7 }),
            ),
            pp,
        )
        .await;
        assert!(status.message.contains("replicaz"), "{status:?}");
    }

    let msg = invalid(
        &api,
        "crd-test-ports",
        cluster(
            "crd-test-ports",
            json!({ "replicas": 4, "image": image, "ports": { "replica": 7000, "client": 7001 } }),
        ),
    )
    .await;
    assert!(
        msg.contains("spec.ports.client must equal spec.ports.replica + 1000"),
        "{msg}"
    );
}

#[tokio::test]
async fn apiserver_refuses_to_change_storage_or_keys_after_creation() {
    let Some(client) = client_or_skip().await else {
        return;
    };
    install_crd(&client).await;
    let api = api(&client);
    let name = "crd-test-immutable";
    let pp = PatchParams::apply(MANAGER).force();
    let spec =
        json!({ "replicas": 4, "image": "kmmr/replica:0.1.0", "storage": { "size": "1Gi" } });
    api.patch(name, &pp, &Patch::Apply(cluster(name, spec)))
        .await
        .expect("create a valid BftCluster");

    let changed =
        json!({ "replicas": 4, "image": "kmmr/replica:0.1.0", "storage": { "size": "2Gi" } });
    let result = api
        .patch(name, &pp, &Patch::Apply(cluster(name, changed)))
        .await;
    let with_keys = json!({
        "replicas": 4, "image": "kmmr/replica:0.1.0", "storage": { "size": "1Gi" },
        "keys": { "secretName": "mine" },
    });
    let keys_result = api
        .patch(name, &pp, &Patch::Apply(cluster(name, with_keys)))
        .await;
    let restored = json!({
        "replicas": 4, "image": "kmmr/replica:0.1.0", "storage": { "size": "1Gi" },
        "restoreFrom": { "claimName": "backups", "file": "demo/kmmr-1-rev2.kmmr" },
    });
    let restore_result = api
        .patch(name, &pp, &Patch::Apply(cluster(name, restored)))
        .await;
    // Clean up before asserting so a failure leaves nothing behind.
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete the test BftCluster");
    match keys_result {
        Ok(_) => panic!("the apiserver let spec.keys be added after creation"),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("spec.keys cannot be added"),
                "{}",
                status.message
            )
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    match restore_result {
        Ok(_) => panic!("the apiserver let spec.restoreFrom be added after creation"),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("spec.restoreFrom can only be set"),
                "{}",
                status.message
            )
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    match result {
        Ok(_) => panic!("the apiserver let spec.storage change"),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains("spec.storage is immutable"),
                "{}",
                status.message
            )
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}
