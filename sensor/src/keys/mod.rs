//! Key identity: which private key made a signature.
//!
//! `material` turns key and certificate files into public keys and SPKI
//! hashes; `verify` checks a captured signature against a public key;
//! `identify` decides, per signing event, which known key it was;
//! `recover` finds the possible keys of an ECDSA signature;
//! `safe_open` opens the files untrusted processes name.
pub mod identify;
pub mod material;
pub mod recover;
pub mod safe_open;
pub mod verify;
