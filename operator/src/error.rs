//! Why a reconcile failed. Each variant has a stable CamelCase [`Error::reason`], used as the
//! `error` label of the failure metric and as the reason of the Warning Event, so a dashboard
//! and `kubectl describe` name the same thing.

use crate::children::BuildError;
use crate::keys::KeyError;

/// A reconcile error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the apiserver failed (network, conflict, forbidden, invalid object).
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// The spec breaks a rule the CRD enforces at admission (stored before the rule existed).
    #[error("{0}")]
    InvalidSpec(String),
    /// The children could not be built (a configuration file could not be rendered).
    #[error("building the cluster's objects: {0}")]
    Build(String),
    /// The user's key Secret is missing, incomplete or malformed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The user's key Secret named in spec.keys.secretName does not exist.
    #[error("Secret {0} named in spec.keys.secretName does not exist in the cluster's namespace: create it with replica-<i>.key for every replica and admin.key")]
    KeySecretMissing(String),
    /// A replica's key Secret is gone while the view still names its public key: generating a
    /// new key would silently change the replica's identity, which only a reconfiguration may do.
    #[error("Secret {secret} with {who}'s private key is gone, but the running view depends on it: restore the Secret from a backup. The operator will not generate a new key for an existing identity (replacing a key is a reconfiguration)")]
    KeyLost { secret: String, who: String },
    /// A key Secret holds a key whose public half is not the one the view lists.
    #[error("{0}'s key Secret does not match its public key in the view: restore the original Secret. The operator will not change an identity outside a reconfiguration")]
    KeyMismatch(String),
    /// The ConfigMap holding the view exists but cannot be read.
    #[error("ConfigMap {name} holds a view the operator cannot read ({why}): restore it or delete it only if no replica has started")]
    ViewUnreadable { name: String, why: String },
    /// The object lacks metadata the apiserver always sets.
    #[error("the BftCluster has no {0}")]
    MissingMetadata(&'static str),
    /// The test-only Byzantine mode annotation is refused (operator not started for tests, or
    /// a bad value).
    #[error("{0}")]
    ByzantineTestMode(String),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The etcd API's certificates could not be issued (spec.etcdAPI).
    #[error(transparent)]
    EtcdCertificates(#[from] crate::etcd_api::CertError),
}

impl Error {
    /// Metric label and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::InvalidSpec(_) => kmmr_crds::condition_reasons::INVALID_SPEC,
            Error::Build(_) => "BuildFailed",
            Error::Keys(_) => "KeysInvalid",
            Error::KeySecretMissing(_) => "KeySecretMissing",
            Error::KeyLost { .. } => "KeyLost",
            Error::KeyMismatch(_) => "KeyMismatch",
            Error::ViewUnreadable { .. } => "ViewUnreadable",
            Error::MissingMetadata(_) => "MissingMetadata",
            Error::Finalizer(_) => "FinalizerFailed",
            Error::ByzantineTestMode(_) => "ByzantineTestModeRefused",
            Error::EtcdCertificates(_) => "EtcdCertificatesFailed",
        }
    }

    /// Every reason, so that the failure metric has all its series from the start.
    pub const REASONS: [&'static str; 12] = [
        "KubeApiError",
        kmmr_crds::condition_reasons::INVALID_SPEC,
        "BuildFailed",
        "KeysInvalid",
        "KeySecretMissing",
        "KeyLost",
        "KeyMismatch",
        "ViewUnreadable",
        "MissingMetadata",
        "FinalizerFailed",
        "ByzantineTestModeRefused",
        "EtcdCertificatesFailed",
    ];

    /// Whether retrying soon can help: a user's mistake waits longer between retries.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Kube(_) | Error::Finalizer(_))
    }
}

impl From<BuildError> for Error {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::InvalidSpec(q) => Error::InvalidSpec(q.to_string()),
            BuildError::MissingMetadata(m) => Error::MissingMetadata(m),
            BuildError::Config(c) => Error::Build(c.to_string()),
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::Finalizer(e.to_string()),
            F::UnnamedObject => Error::MissingMetadata("metadata.name"),
            F::InvalidFinalizer => Error::Finalizer("invalid finalizer".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_for_the_metric() {
        let samples = [
            Error::InvalidSpec("x".into()),
            Error::Build("x".into()),
            Error::KeySecretMissing("s".into()),
            Error::KeyLost {
                secret: "s".into(),
                who: "replica 1".into(),
            },
            Error::KeyMismatch("replica 1".into()),
            Error::ViewUnreadable {
                name: "c".into(),
                why: "w".into(),
            },
            Error::MissingMetadata("m"),
            Error::Finalizer("f".into()),
            Error::ByzantineTestMode("b".into()),
            Error::EtcdCertificates(crate::etcd_api::CertError::Rcgen(
                rcgen::Error::CouldNotParseKeyPair,
            )),
        ];
        for e in samples {
            assert!(Error::REASONS.contains(&e.reason()), "{}", e.reason());
        }
    }
}
