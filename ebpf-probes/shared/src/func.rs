//! One description per probed function, read by both sides.
//!
//! The kernel's entry and return programs take their arguments and find
//! the signature by what [`FUNCTIONS`] says about a function; the sensor
//! attaches probes, places them and names functions in events from the
//! same entries. Adding a signing function is one entry here, plus the
//! symbol pattern that finds it (`sensor/src/discovery/signing_code.rs`).
//!
//! An attach cookie carries the function id in its low byte and the
//! sensor's library index above it (see [`cookie`]).

/// Function ids: an entry's position in [`FUNCTIONS`], plus one (0 is
/// no function).
pub const DIGEST_SIGN_INIT: u8 = 1;
pub const DIGEST_SIGN_INIT_EX: u8 = 2;
pub const DIGEST_SIGN_UPDATE: u8 = 3;
pub const DIGEST_SIGN: u8 = 4;
pub const DIGEST_SIGN_FINAL: u8 = 5;
pub const PKEY_SIGN: u8 = 6;
pub const PKEY_FREE: u8 = 7;
pub const PKEY_SIGN_INIT: u8 = 8;
pub const RUST_SIGNER_SIGN: u8 = 9;
pub const RING_ECDSA_SIGN: u8 = 10;
pub const RING_ED25519_SIGN: u8 = 11;
pub const PKEY_FREED: u8 = 12;
pub const ECDSA_DO_SIGN: u8 = 13;
pub const ECDSA_SIGN: u8 = 14;
pub const RSA_SIGN: u8 = 15;
pub const RSA_PRIVATE_ENCRYPT: u8 = 16;
pub const GNUTLS_SIGN_DATA2: u8 = 17;
pub const GNUTLS_SIGN_HASH2: u8 = 18;
pub const GNUTLS_SIGN_DATA: u8 = 19;
pub const GNUTLS_SIGN_HASH: u8 = 20;
pub const NSS_SIGN_WITH_MECHANISM: u8 = 21;
pub const GO_ECDSA_SIGN: u8 = 22;
pub const GO_ECDSA_SIGN_ASN1: u8 = 23;
pub const GO_RSA_SIGN_PKCS1V15: u8 = 24;
pub const GO_RSA_SIGN_PSS: u8 = 25;
pub const GO_ED25519_SIGN: u8 = 26;
pub const GO_ED25519_SIGN_WITH_DOM: u8 = 27;
pub const GNUTLS_PRIVKEY_DEINIT: u8 = 28;
pub const GCRY_PK_SIGN: u8 = 29;

/// A probed function: its id, what events call it, and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub id: u8,
    /// The name events give it (`module.function_name`).
    pub name: &'static str,
    pub role: Role,
}

/// What a call means to the probes. Numbers are argument positions in
/// the function's ABI (System V; for a Rust function returning a large
/// value, position 0 is the hidden result pointer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Binds a digest-signing context to a key object, and optionally a
    /// digest name (a C string).
    BindContext {
        context: u8,
        key: u8,
        digest_name: Option<u8>,
    },
    /// Streams message bytes into a bound context.
    Update { context: u8, data: u8, len: u8 },
    /// Makes one signature.
    Sign(SignCall),
    /// Makes one signature, in Go code: positions are in Go's register
    /// ABI ([`go_reg`]), and the result is read at each return
    /// instruction, never by a return probe (see `GoOutput`).
    GoSign(SignCall),
    /// The object in `object` stops being the key it was: freed, or a
    /// context rebound to another key.
    Forget { object: u8 },
    /// A probe inside a free function, past its reference-count test: the
    /// object is in the register the attach cookie names
    /// ([`cookie_register`]). The sensor finds that place per build.
    Freed,
}

/// Where a buffer signature's length is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// Written through a pointer argument (`size_t *`, or `unsigned int *`
    /// when `int`); the call returns 1 on success.
    Written(Len),
    /// Returned (negative on failure).
    Returned,
}

/// How a signing call names its key, takes its input and returns the
/// signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignCall {
    /// The argument holding the key object or the context bound to one.
    pub handle: u8,
    pub handle_is: Handle,
    pub input: Input,
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handle {
    /// A digest-signing context (`EVP_MD_CTX`): the key and digest name
    /// are what its [`Role::BindContext`] call bound.
    DigestContext,
    /// A key context (`EVP_PKEY_CTX`), signing a digest it is given.
    KeyContext,
    /// A Rust signer object. These are short-lived boxes whose addresses
    /// are reused for other keys, and nothing reports their frees, so
    /// every signature is captured and verified.
    RustSigner,
    /// A low-level key object (`EC_KEY`, `RSA`), as OpenSSH and other
    /// programs older than EVP sign with, or an NSS `SECKEYPrivateKey`.
    /// The probes do not watch its frees either, so, as for a Rust
    /// signer, every signature is captured and verified.
    KeyObject,
    /// A key object whose frees the probes watch (a `gnutls_privkey_t`,
    /// freed by `gnutls_privkey_deinit`), signing what it is given: a
    /// verdict is kept for it until it is freed.
    WatchedKeyObject,
    /// A Go key object (`*ecdsa.PrivateKey` and the like). Go's collector
    /// frees keys without a call the probes could see, so the probes name
    /// it by its address folded with 64 bits of its public key, read at
    /// the end of `path`: from the key, follow a pointer at each offset
    /// but the last, then read the word at the last. A new key at a
    /// reused address has another public key, so a verdict is kept for
    /// the name. (Never the private half: only public fields are read.)
    GoKey(KeyPath),
    /// libgcrypt's key S-expression (`gcry_sexp_t`). Callers build one
    /// per call (gpg-agent reads its key file each time) and nothing
    /// reports its frees, so no verdict is kept: the return probe copies
    /// the key's public parameters at every signature (`Output::Sexp`).
    KeySexp,
}

/// Offsets from a Go key object to a word of its public key (see
/// `Handle::GoKey`): `len` of them are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPath {
    pub offsets: [u8; 3],
    pub len: u8,
}

impl Handle {
    /// Whether a verdict on a signature can be kept for the handle: for
    /// objects whose frees the probes see (`Role::Forget`), and Go keys,
    /// named by their public key.
    pub const fn cached(self) -> bool {
        matches!(
            self,
            Handle::DigestContext
                | Handle::KeyContext
                | Handle::WatchedKeyObject
                | Handle::GoKey(_)
        )
    }
}

/// An integer argument: its position, and whether it is a C `int` (32
/// bits: the upper half of its register is undefined) or a `size_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Len {
    pub arg: u8,
    pub int: bool,
}

const fn size_t(arg: u8) -> Len {
    Len { arg, int: false }
}

const fn int(arg: u8) -> Len {
    Len { arg, int: true }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// The message itself: pointer and length arguments.
    Message { data: u8, len: Len },
    /// A digest of the message (or, for `RSA_private_encrypt`, the
    /// encoded digest): pointer and length arguments.
    Digest { data: u8, len: Len },
    /// What the context's [`Role::Update`] calls streamed.
    Streamed,
    /// A pointer argument to a buffer descriptor holding the message, or
    /// a digest when `digest` is set: a data pointer at byte `at`, then
    /// an `unsigned int` length (GnuTLS's `gnutls_datum_t`, at 0; NSS's
    /// `SECItem`, after its type, at 8).
    Datum { datum: u8, at: u8, digest: bool },
    /// A data S-expression (`gcry_sexp_t`: `(data (flags …) (value …))`
    /// or `(hash …)`), which names its own hash: copied at the return,
    /// with the key's and the signature's (see `Output::Sexp`).
    Sexp { data: u8 },
}

impl Input {
    /// Whether the input is a digest of the message, not the message.
    pub const fn is_digest(self) -> bool {
        matches!(
            self,
            Input::Digest { .. } | Input::Datum { digest: true, .. }
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Into a caller's buffer. A null buffer is a length query, not a
    /// signature.
    Buffer { out: u8, len: Length },
    /// A returned `ECDSA_SIG *`: two `BIGNUM *`, r and s (null on failure).
    Bignums,
    /// `Result<Vec<u8>, _>` through the hidden result pointer.
    RustVec { result: u8 },
    /// ring's `Signature`, which keeps its bytes inline, by value through
    /// the hidden result pointer.
    RingSignature { result: u8 },
    /// A buffer descriptor (as [`Input::Datum`], data pointer at byte
    /// `at`) the call fills with the signature: GnuTLS allocates the
    /// buffer, NSS writes into the caller's. Both return 0 on success,
    /// a negative error otherwise.
    Datum { out: u8, at: u8 },
    /// What a Go function returns (see [`GoOutput`]).
    Go(GoOutput),
    /// A `gcry_sexp_t *` the call sets to the signature's S-expression
    /// (`(sig-val (ecdsa (r …) (s …)))`); it returns 0 on success. The
    /// return probe (`sexp_sign_return`, not `sign_return`) copies it,
    /// the data's, and the key's public parameters: a key S-expression
    /// holds the private key too, which is never copied.
    Sexp { out: u8 },
}

/// Where a Go signing function leaves its signature, read at its return
/// instructions. A uretprobe rewrites the return address on the stack,
/// which Go's stack copying and unwinding do not expect: it crashes
/// the program. So the probes read results in the registers at each
/// `ret` instead, and key the call by its goroutine (`R14`), not its
/// thread, since a goroutine can resume on another thread mid-call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoOutput {
    /// A `[]byte` result (pointer in `RAX`, length in `RBX`), followed
    /// by an `error` whose type word is at result position `error`
    /// (non-zero on failure), or by nothing ([`GO_NO_ERROR`]).
    Slice { error: u8 },
    /// `(r, s *big.Int, err error)`: two `big.Int`s (a sign, then the
    /// magnitude as a slice of little-endian 64-bit words), the error's
    /// type word at position 2.
    BigInts,
    /// Nothing returned: the function fills the `[]byte` argument at
    /// position `out`, `len` bytes (Ed25519's 64).
    Into { out: u8, len: u8 },
}

/// `GoOutput::Slice` of a function that returns no error.
pub const GO_NO_ERROR: u8 = 0xff;

/// Go's integer argument and result registers (ABIInternal, Go 1.17 and
/// later, amd64), in assignment order: a `Role::GoSign` position is an
/// index here. A slice takes three (pointer, length, capacity), an
/// interface or a string two, a pointer one.
pub mod go_reg {
    pub const RAX: u8 = 0;
    pub const RBX: u8 = 1;
    pub const RCX: u8 = 2;
    pub const RDI: u8 = 3;
    pub const RSI: u8 = 4;
    pub const R8: u8 = 5;
    pub const R9: u8 = 6;
    pub const R10: u8 = 7;
    pub const R11: u8 = 8;
    /// How many there are.
    pub const COUNT: usize = 9;
}

const fn sign(handle: u8, handle_is: Handle, input: Input, output: Output) -> Role {
    Role::Sign(SignCall {
        handle,
        handle_is,
        input,
        output,
    })
}

/// OpenSSL's EVP API, shared by OpenSSL 1.1 and 3.x, BoringSSL and
/// AWS-LC (those two lack the `_ex` variants): a buffer and a `size_t *`.
const EVP_OUT: Output = Output::Buffer {
    out: 1,
    len: Length::Written(size_t(2)),
};

/// The low-level calls' `(…, sig, unsigned int *siglen, key)`.
const LEGACY_OUT: Output = Output::Buffer {
    out: 3,
    len: Length::Written(int(4)),
};

/// GnuTLS's `gnutls_privkey_sign_*(signer, algo, flags, const
/// gnutls_datum_t *in, gnutls_datum_t *signature)`: every one takes the
/// same arguments, only what `in` holds differs. A TLS handshake (1.2 and
/// 1.3, GnuTLS 3.7) makes its one signature with `sign_data2`. The key
/// object lives as long as the credentials (a server's, all its life)
/// and is freed by `gnutls_privkey_deinit`, which the probes watch.
const fn gnutls(digest: bool) -> Role {
    sign(
        0,
        Handle::WatchedKeyObject,
        Input::Datum {
            datum: 3,
            at: 0,
            digest,
        },
        Output::Datum { out: 4, at: 0 },
    )
}

/// A Go signing call: the key (a pointer) at `handle`, a word of its
/// public key at `path`, the signed bytes a slice at `data` (its length
/// in the next register).
const fn go(handle: u8, path: KeyPath, data: u8, digest: bool, output: GoOutput) -> Role {
    let len = size_t(data + 1);
    Role::GoSign(SignCall {
        handle,
        handle_is: Handle::GoKey(path),
        input: if digest {
            Input::Digest { data, len }
        } else {
            Input::Message { data, len }
        },
        output: Output::Go(output),
    })
}

/// `([]byte, error)`: the error's type word follows the slice's three.
const GO_BYTES_ERR: GoOutput = GoOutput::Slice { error: go_reg::RDI };

/// `ecdsa.PrivateKey` starts with its `PublicKey`: a `Curve` interface (two
/// words), then `X *big.Int`; a `big.Int` is a sign word, then its
/// magnitude's words (a slice): the low word of X.
const ECDSA_X: KeyPath = KeyPath {
    offsets: [16, 8, 0],
    len: 3,
};

/// `rsa.PrivateKey` starts with its `PublicKey`, which starts with
/// `N *big.Int`: the low word of N.
const RSA_N: KeyPath = KeyPath {
    offsets: [0, 8, 0],
    len: 3,
};

/// An Ed25519 private key (the `crypto/ed25519` slice, and the FIPS
/// module's struct alike) holds the 32-byte seed, then the public key:
/// its first word.
const ED25519_PUBLIC: KeyPath = KeyPath {
    offsets: [32, 0, 0],
    len: 1,
};

/// Every probed function, in id order.
pub const FUNCTIONS: [Function; 29] = [
    Function {
        id: DIGEST_SIGN_INIT,
        name: "EVP_DigestSignInit",
        // (ctx, pctx, type, engine, pkey)
        role: Role::BindContext {
            context: 0,
            key: 4,
            digest_name: None,
        },
    },
    Function {
        id: DIGEST_SIGN_INIT_EX,
        name: "EVP_DigestSignInit_ex",
        // (ctx, pctx, mdname, libctx, props, pkey, params)
        role: Role::BindContext {
            context: 0,
            key: 5,
            digest_name: Some(2),
        },
    },
    Function {
        id: DIGEST_SIGN_UPDATE,
        name: "EVP_DigestSignUpdate",
        role: Role::Update {
            context: 0,
            data: 1,
            len: 2,
        },
    },
    Function {
        id: DIGEST_SIGN,
        name: "EVP_DigestSign",
        // (ctx, sig, siglen, tbs, tbslen)
        role: sign(
            0,
            Handle::DigestContext,
            Input::Message {
                data: 3,
                len: size_t(4),
            },
            EVP_OUT,
        ),
    },
    Function {
        id: DIGEST_SIGN_FINAL,
        name: "EVP_DigestSignFinal",
        // (ctx, sig, siglen)
        role: sign(0, Handle::DigestContext, Input::Streamed, EVP_OUT),
    },
    Function {
        id: PKEY_SIGN,
        name: "EVP_PKEY_sign",
        // (pctx, sig, siglen, tbs, tbslen)
        role: sign(
            0,
            Handle::KeyContext,
            Input::Digest {
                data: 3,
                len: size_t(4),
            },
            EVP_OUT,
        ),
    },
    Function {
        id: PKEY_FREE,
        name: "EVP_PKEY_free",
        role: Role::Forget { object: 0 },
    },
    Function {
        id: PKEY_SIGN_INIT,
        // Also EVP_PKEY_sign_init_ex. A context must be (re)initialized
        // before it signs with another key; hooking the init, not
        // EVP_PKEY_CTX_free, keeps a signing loop at one trap (openssl
        // speed frees a context per signature).
        name: "EVP_PKEY_sign_init",
        role: Role::Forget { object: 0 },
    },
    Function {
        id: RUST_SIGNER_SIGN,
        // `<T as rustls::crypto::signer::Signer>::sign(&self, message:
        // &[u8]) -> Result<Vec<u8>, rustls::Error>`, any provider.
        name: "rustls::crypto::signer::Signer::sign",
        role: sign(
            1,
            Handle::RustSigner,
            Input::Message {
                data: 2,
                len: size_t(3),
            },
            Output::RustVec { result: 0 },
        ),
    },
    Function {
        id: RING_ECDSA_SIGN,
        // `(&self, rng: &dyn SecureRandom, message) -> Result<Signature,
        // Unspecified>`: the rng takes two words.
        name: "ring::ec::suite_b::ecdsa::signing::EcdsaKeyPair::sign",
        role: sign(
            1,
            Handle::RustSigner,
            Input::Message {
                data: 4,
                len: size_t(5),
            },
            Output::RingSignature { result: 0 },
        ),
    },
    Function {
        id: RING_ED25519_SIGN,
        // `(&self, message) -> Signature`
        name: "ring::ec::curve25519::ed25519::signing::Ed25519KeyPair::sign",
        role: sign(
            1,
            Handle::RustSigner,
            Input::Message {
                data: 2,
                len: size_t(3),
            },
            Output::RingSignature { result: 0 },
        ),
    },
    Function {
        id: PKEY_FREED,
        name: "EVP_PKEY_free",
        role: Role::Freed,
    },
    // The low-level calls below sign a digest with an `EC_KEY` or `RSA`
    // (OpenSSH, older programs). OpenSSL's own EVP path reaches some of
    // them (RSA through `RSA_sign`), BoringSSL's and AWS-LC's reach all;
    // such a nested call is not a second signature (see `sign_entry`).
    Function {
        id: ECDSA_DO_SIGN,
        name: "ECDSA_do_sign",
        // (dgst, int dlen, eckey) -> ECDSA_SIG *
        role: sign(
            2,
            Handle::KeyObject,
            Input::Digest {
                data: 0,
                len: int(1),
            },
            Output::Bignums,
        ),
    },
    Function {
        id: ECDSA_SIGN,
        name: "ECDSA_sign",
        // (type, dgst, int dlen, sig, unsigned int *siglen, eckey)
        role: sign(
            5,
            Handle::KeyObject,
            Input::Digest {
                data: 1,
                len: int(2),
            },
            LEGACY_OUT,
        ),
    },
    Function {
        id: RSA_SIGN,
        name: "RSA_sign",
        // (type, m, unsigned int m_len, sigret, unsigned int *siglen, rsa)
        role: sign(
            5,
            Handle::KeyObject,
            Input::Digest {
                data: 1,
                len: int(2),
            },
            LEGACY_OUT,
        ),
    },
    Function {
        id: RSA_PRIVATE_ENCRYPT,
        name: "RSA_private_encrypt",
        // (int flen, from, to, rsa, padding) -> signature length
        role: sign(
            3,
            Handle::KeyObject,
            Input::Digest {
                data: 1,
                len: int(0),
            },
            Output::Buffer {
                out: 2,
                len: Length::Returned,
            },
        ),
    },
    Function {
        id: GNUTLS_SIGN_DATA2,
        name: "gnutls_privkey_sign_data2",
        role: gnutls(false),
    },
    Function {
        id: GNUTLS_SIGN_HASH2,
        name: "gnutls_privkey_sign_hash2",
        role: gnutls(true),
    },
    Function {
        id: GNUTLS_SIGN_DATA,
        name: "gnutls_privkey_sign_data",
        role: gnutls(false),
    },
    Function {
        id: GNUTLS_SIGN_HASH,
        name: "gnutls_privkey_sign_hash",
        role: gnutls(true),
    },
    Function {
        id: NSS_SIGN_WITH_MECHANISM,
        name: "PK11_SignWithMechanism",
        // NSS's `(SECKEYPrivateKey *key, CK_MECHANISM_TYPE mechanism,
        // const SECItem *param, SECItem *sig, const SECItem *hash)`.
        // `PK11_Sign` tail-calls it and TLS (`ssl3_SignHashes`) calls
        // one or the other, so this one probe sees each signature once.
        // `hash` is a digest (for RSA PKCS #1 v1.5, its DigestInfo);
        // `SECItem` is `{SECItemType type; unsigned char *data;
        // unsigned int len}`. The key object's frees are not watched.
        role: sign(
            0,
            Handle::KeyObject,
            Input::Datum {
                datum: 4,
                at: 8,
                digest: true,
            },
            Output::Datum { out: 3, at: 8 },
        ),
    },
    // Go's own crypto (`crypto/tls` signs through `crypto.Signer`). Each
    // Go version is probed at the one function every signing path of its
    // algorithm goes through (`sensor/src/discovery/go.rs` says which
    // versions use which); each is too large for the compiler to inline.
    Function {
        id: GO_ECDSA_SIGN,
        // Go 1.18-1.19: `Sign(rand io.Reader, priv *PrivateKey, hash
        // []byte) (r, s *big.Int, err error)`; `SignASN1` and the
        // key's `Sign` call it.
        name: "crypto/ecdsa.Sign",
        role: go(go_reg::RCX, ECDSA_X, go_reg::RDI, true, GoOutput::BigInts),
    },
    Function {
        id: GO_ECDSA_SIGN_ASN1,
        // Go 1.20 and later: `SignASN1(rand, priv, hash) ([]byte,
        // error)`; `Sign` and the key's `Sign` call it.
        name: "crypto/ecdsa.SignASN1",
        role: go(go_reg::RCX, ECDSA_X, go_reg::RDI, true, GO_BYTES_ERR),
    },
    Function {
        id: GO_RSA_SIGN_PKCS1V15,
        // `(rand, priv *PrivateKey, hash crypto.Hash, hashed []byte)
        // ([]byte, error)`
        name: "crypto/rsa.SignPKCS1v15",
        role: go(go_reg::RCX, RSA_N, go_reg::RSI, true, GO_BYTES_ERR),
    },
    Function {
        id: GO_RSA_SIGN_PSS,
        // `(rand, priv, hash, digest []byte, opts *PSSOptions) ([]byte,
        // error)`
        name: "crypto/rsa.SignPSS",
        role: go(go_reg::RCX, RSA_N, go_reg::RSI, true, GO_BYTES_ERR),
    },
    Function {
        id: GO_ED25519_SIGN,
        // Go 1.18-1.23: `sign(signature, privateKey, message []byte,
        // ...)`, which `Sign` and the key's `Sign` call; it fills
        // `signature`.
        name: "crypto/ed25519.sign",
        role: go(
            go_reg::RDI,
            ED25519_PUBLIC,
            go_reg::R9,
            false,
            GoOutput::Into {
                out: go_reg::RAX,
                len: 64,
            },
        ),
    },
    Function {
        id: GO_ED25519_SIGN_WITH_DOM,
        // Go 1.24 and later: `signWithDom(signature []byte, priv
        // *PrivateKey, message []byte, domPrefix, context string)
        // []byte`, under every Ed25519 variant.
        name: "crypto/internal/fips140/ed25519.signWithDom",
        role: go(
            go_reg::RDI,
            ED25519_PUBLIC,
            go_reg::RSI,
            false,
            GoOutput::Slice { error: GO_NO_ERROR },
        ),
    },
    Function {
        id: GNUTLS_PRIVKEY_DEINIT,
        // `void gnutls_privkey_deinit(gnutls_privkey_t key)`
        name: "gnutls_privkey_deinit",
        role: Role::Forget { object: 0 },
    },
    Function {
        id: GCRY_PK_SIGN,
        // libgcrypt's `gcry_error_t gcry_pk_sign(gcry_sexp_t *result,
        // gcry_sexp_t data, gcry_sexp_t skey)`: every signature GnuPG
        // makes (in gpg-agent) goes through it.
        name: "gcry_pk_sign",
        role: sign(
            2,
            Handle::KeySexp,
            Input::Sexp { data: 1 },
            Output::Sexp { out: 0 },
        ),
    },
];

// Ids are positions plus one, so `describe` is an index, not a search.
const _: () = {
    let mut i = 0;
    while i < FUNCTIONS.len() {
        assert!(FUNCTIONS[i].id as usize == i + 1);
        i += 1;
    }
};

/// The function with this id.
#[inline(always)]
pub fn describe(id: u8) -> Option<&'static Function> {
    // `black_box` keeps the bounds check and the table access on one
    // value. Otherwise LLVM checks `id - 13` and indexes with `id`, and
    // the BPF verifier, which cannot relate the two, refuses the load.
    let index = core::hint::black_box((id as usize).wrapping_sub(1));
    FUNCTIONS.get(index)
}

/// The signing call this id makes, if it signs (in C, Rust or Go).
#[inline(always)]
pub fn sign_call(id: u8) -> Option<SignCall> {
    match describe(id) {
        Some(Function {
            role: Role::Sign(call) | Role::GoSign(call),
            ..
        }) => Some(*call),
        _ => None,
    }
}

/// Whether the function is Go code (probed at entry and at each return
/// instruction, not with a return probe).
#[inline(always)]
pub fn is_go(id: u8) -> bool {
    matches!(
        describe(id),
        Some(Function {
            role: Role::GoSign(_),
            ..
        })
    )
}

/// Whether the function's result is read by `sexp_sign_return` (libgcrypt),
/// not `sign_return`.
#[inline(always)]
pub fn returns_sexp(id: u8) -> bool {
    matches!(
        sign_call(id),
        Some(SignCall {
            output: Output::Sexp { .. },
            ..
        })
    )
}

/// Whether a signature from this function is verified every time, not
/// cached by its handle (see [`Handle::cached`]).
#[inline(always)]
pub fn verified_every_time(id: u8) -> bool {
    sign_call(id).is_some_and(|c| !c.handle_is.cached())
}

/// Registers a probe inside a function can be told to read a pointer
/// from (callee-saved ones, and the first two argument registers).
pub mod reg {
    pub const RDI: u8 = 1;
    pub const RSI: u8 = 2;
    pub const RBX: u8 = 3;
    pub const RBP: u8 = 4;
    pub const R12: u8 = 5;
    pub const R13: u8 = 6;
    pub const R14: u8 = 7;
    pub const R15: u8 = 8;
}

/// Splits a cookie into (library index, function id).
pub const fn split_cookie(cookie: u64) -> (u32, u8) {
    ((cookie >> 8) as u32, (cookie & 0xff) as u8)
}

pub const fn cookie(library: u32, func: u8) -> u64 {
    ((library as u64) << 8) | func as u64
}

/// A cookie that also names a register (`reg`), in its top byte.
pub const fn cookie_with_register(library: u32, func: u8, register: u8) -> u64 {
    cookie(library, func) | (register as u64) << 56
}

pub const fn cookie_register(cookie: u64) -> u8 {
    (cookie >> 56) as u8
}
