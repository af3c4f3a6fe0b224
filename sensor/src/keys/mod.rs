//! Key identity: which private key made a signature.
//!
//! `material` turns key and certificate files into public keys and SPKI
//! hashes; `verify` checks a captured signature against a public key;
//! `identify` decides, per signing event, which known key it was.
pub mod identify;
pub mod material;
pub mod verify;
