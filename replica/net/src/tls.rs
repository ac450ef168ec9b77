//! Certificates made from ed25519 identities, and the verifiers that pin them.
//!
//! A principal's certificate is self-signed and generated at start-up from its
//! [`KeyPair`](kmmr_protocol::crypto::KeyPair); nothing in it but the key matters. The verifiers ignore
//! names, issuers and validity dates and accept a peer iff its certificate's SubjectPublicKeyInfo
//! is an ed25519 key that the caller allows (see the module docs of [`crate::net`] for why).
//! Handshake signatures are checked by rustls's `verify_tls13_signature` with ring's algorithms,
//! restricted to ed25519. Only TLS 1.3 is offered or accepted, and session resumption is off, so
//! every connection proves its key afresh.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

use kmmr_protocol::crypto::{KeyPair, PublicKey};

/// DER of an ed25519 SubjectPublicKeyInfo up to the key (RFC 8410: the algorithm identifier has
/// no parameters, so the encoding is fixed; DER admits exactly one encoding).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER of a PKCS#8 v1 ed25519 private key up to the 32-byte seed (RFC 8410 section 7).
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// ALPN protocol names keep replica and client links apart even if addresses get mixed up, and
/// tell which version of the replica protocol a replica link speaks.
pub(crate) const ALPN_CLIENT: &[u8] = b"kmmr-client/1";

/// The version of the replica-to-replica protocol a link speaks, agreed in its TLS handshake:
/// the dialer offers every version it speaks, newest first, and the listener picks the newest
/// it speaks too. So a replica rolled to a new release keeps talking to those not rolled yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerProtocol {
    /// Unsigned WRITEs, collects without proofs.
    V1,
    /// Signed WRITEs, and collects with a proof of the WRITEs their value was accepted on.
    V2,
}

impl PeerProtocol {
    pub const NEWEST: PeerProtocol = PeerProtocol::V2;

    /// Every version, newest first.
    const ALL: [PeerProtocol; 2] = [PeerProtocol::V2, PeerProtocol::V1];

    fn alpn(self) -> &'static [u8] {
        match self {
            PeerProtocol::V1 => b"kmmr-peer/1",
            PeerProtocol::V2 => b"kmmr-peer/2",
        }
    }

    /// The version an agreed ALPN name stands for.
    pub fn of_alpn(name: &[u8]) -> Option<PeerProtocol> {
        Self::ALL.into_iter().find(|p| p.alpn() == name)
    }

    /// Its number, as a link's atomic cell holds it (0 stands for "not agreed yet").
    pub(crate) fn number(self) -> u8 {
        match self {
            PeerProtocol::V1 => 1,
            PeerProtocol::V2 => 2,
        }
    }

    pub(crate) fn of_number(n: u8) -> Option<PeerProtocol> {
        Self::ALL.into_iter().find(|p| p.number() == n)
    }

    /// The ALPN names of this version and every older one, newest first.
    pub(crate) fn offers(self) -> Vec<&'static [u8]> {
        Self::ALL
            .into_iter()
            .filter(|p| *p <= self)
            .map(PeerProtocol::alpn)
            .collect()
    }
}

/// Which listener a connection is for. The two use distinct ALPN names, so a link made for one
/// cannot be established with the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Replica to replica ([`PeerNetwork`](super::PeerNetwork)), speaking up to this version.
    Peer(PeerProtocol),
    /// Client to replica ([`ClientListener`](super::ClientListener)).
    Client,
}

impl LinkKind {
    fn alpn(self) -> Vec<&'static [u8]> {
        match self {
            LinkKind::Peer(p) => p.offers(),
            LinkKind::Client => vec![ALPN_CLIENT],
        }
    }
}

/// Server name given to rustls when dialing; an IP address, so no SNI is sent. Our verifiers
/// ignore it: the identity is the pinned key.
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED).into())
}

/// A principal's TLS credentials: the self-signed certificate and the private key in PKCS#8.
pub struct TlsIdentity {
    public: PublicKey,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsIdentity({:?})", self.public)
    }
}

impl TlsIdentity {
    /// Builds a self-signed certificate for `key`.
    pub fn new(key: &KeyPair) -> Result<Self, rcgen::Error> {
        let mut der = Vec::with_capacity(ED25519_PKCS8_V1_PREFIX.len() + 32);
        der.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
        der.extend_from_slice(&key.seed());
        let pkcs8 = PrivatePkcs8KeyDer::from(der);
        let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
        let mut params = rcgen::CertificateParams::new(vec!["kmmr".to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kmmr");
        let cert = params.self_signed(&signer)?;
        Ok(TlsIdentity {
            public: key.public(),
            cert: cert.der().clone(),
            key: pkcs8,
        })
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A rustls client configuration that presents this identity and accepts only a server that
    /// proves `server_key`, for tools and tests that drive a raw TLS stream (the node and the
    /// client proxy use [`PeerNetwork`](super::PeerNetwork) and
    /// [`ClientConnector`](super::ClientConnector)). Pass [`server_name`] to the connector.
    pub fn client_config(
        &self,
        server_key: PublicKey,
        kind: LinkKind,
    ) -> Result<Arc<ClientConfig>, Error> {
        client_config(self, server_key, &kind.alpn())
    }

    fn chain_and_key(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

/// The ed25519 key in a certificate's SubjectPublicKeyInfo. Errors (never panics) on a
/// certificate that does not parse or whose key is of another type.
pub fn ed25519_key_of_certificate(cert: &CertificateDer<'_>) -> Result<PublicKey, Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    let spki = parsed.subject_public_key_info();
    let bytes: &[u8] = spki.as_ref();
    match bytes.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(key) => match <[u8; 32]>::try_from(key) {
            Ok(k) => Ok(PublicKey(k)),
            Err(_) => Err(Error::InvalidCertificate(CertificateError::BadEncoding)),
        },
        None => Err(Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(NotEd25519)),
        ))),
    }
}

/// A certificate whose key is not an ed25519 key.
#[derive(Debug, thiserror::Error)]
#[error("the certificate's public key is not ed25519")]
struct NotEd25519;

/// Which keys a verifier lets in.
pub(crate) trait KeyPolicy: Send + Sync + 'static {
    fn allows(&self, key: &PublicKey) -> bool;
}

/// The single key pinned for a dialed replica.
#[derive(Debug)]
pub(crate) struct Pinned(pub PublicKey);

impl KeyPolicy for Pinned {
    fn allows(&self, key: &PublicKey) -> bool {
        *key == self.0
    }
}

/// Any ed25519 key (client links): the key is the client's identity.
#[derive(Debug)]
pub(crate) struct AnyKey;

impl KeyPolicy for AnyKey {
    fn allows(&self, _: &PublicKey) -> bool {
        true
    }
}

/// A verifier for both roles that applies a [`KeyPolicy`] to the presented key.
pub(crate) struct KeyVerifier<P> {
    policy: P,
    algorithms: WebPkiSupportedAlgorithms,
}

impl<P> fmt::Debug for KeyVerifier<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyVerifier")
    }
}

impl<P: KeyPolicy> KeyVerifier<P> {
    pub(crate) fn new(policy: P) -> Self {
        KeyVerifier {
            policy,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), Error> {
        let key = ed25519_key_of_certificate(end_entity)?;
        if self.policy.allows(&key) {
            Ok(())
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

impl<P: KeyPolicy> ServerCertVerifier for KeyVerifier<P> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl<P: KeyPolicy> ClientCertVerifier for KeyVerifier<P> {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// ring, and nothing else, whatever other crates in the build enable.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A server configuration presenting `identity` and admitting clients that `policy` allows.
pub(crate) fn server_config<P: KeyPolicy>(
    identity: &TlsIdentity,
    policy: P,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let (chain, key) = identity.chain_and_key();
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(KeyVerifier::new(policy)))
        .with_single_cert(chain, key)?;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `identity` and accepting only a server with key `pinned`.
pub(crate) fn client_config(
    identity: &TlsIdentity,
    pinned: PublicKey,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let (chain, key) = identity.chain_and_key();
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KeyVerifier::new(Pinned(pinned))))
        .with_client_auth_cert(chain, key)?;
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The key a completed TLS connection's peer proved. Our verifiers ran on this certificate, so
/// it parses; an error here means a bug or a rustls change, and the caller closes the connection.
pub(crate) fn peer_key(certs: Option<&[CertificateDer<'static>]>) -> Result<PublicKey, Error> {
    match certs.and_then(|c| c.first()) {
        Some(cert) => ed25519_key_of_certificate(cert),
        None => Err(Error::NoCertificatesPresented),
    }
}

/// The reason to count for a failed handshake.
pub(crate) fn classify_handshake_error(e: &std::io::Error) -> super::RejectReason {
    use super::RejectReason;
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>());
    match tls {
        Some(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)) => {
            RejectReason::UnknownKey
        }
        Some(Error::InvalidCertificate(_)) | Some(Error::NoCertificatesPresented) => {
            RejectReason::BadCertificate
        }
        _ => RejectReason::Handshake,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let k = KeyPair::from_seed([9; 32]);
        let id = TlsIdentity::new(&k).unwrap();
        assert_eq!(
            ed25519_key_of_certificate(id.certificate()).unwrap(),
            k.public()
        );
    }

    #[test]
    fn garbage_certificates_are_errors_not_panics() {
        for bytes in [
            vec![],
            vec![0x30],
            vec![0x30, 0x82, 0xff, 0xff],
            vec![0u8; 100],
        ] {
            assert!(ed25519_key_of_certificate(&CertificateDer::from(bytes)).is_err());
        }
        let k = KeyPair::from_seed([1; 32]);
        let mut der = TlsIdentity::new(&k).unwrap().certificate().to_vec();
        for i in 0..der.len() {
            der[i] ^= 0x55;
            let _ = ed25519_key_of_certificate(&CertificateDer::from(der.clone()));
            der[i] ^= 0x55;
        }
    }

    #[test]
    fn pinned_verifier_refuses_another_key() {
        let a = TlsIdentity::new(&KeyPair::from_seed([1; 32])).unwrap();
        let b = TlsIdentity::new(&KeyPair::from_seed([2; 32])).unwrap();
        let v = KeyVerifier::new(Pinned(a.public()));
        assert!(v.check(a.certificate()).is_ok());
        assert!(matches!(
            v.check(b.certificate()),
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))
        ));
    }
}
