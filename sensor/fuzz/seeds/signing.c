/*
 * Seed for the elf_scan fuzz target: a shared object with the symbols and
 * strings discovery/signing_code.rs looks for, so that fuzzing starts from
 * inputs that reach symbol classification (C, AWS-LC-prefixed, BoringSSL
 * and Rust names), the free-path decoder, and, built stripped with hidden
 * symbols, the marker search. `cargo xtask fuzz` compiles it with `cc`
 * (twice: as is, and `-fvisibility=hidden -s`); it is never run or linked.
 */

struct pkey {
    int references;
    void *data;
};

/* The marker strings: source paths OpenSSL records for errors, Rust crate
 * paths recorded for panics. */
__attribute__((used)) const char sigver_file[] = "crypto/evp/m_sigver.c";
__attribute__((used)) const char ring_panic[] =
    "/cargo/registry/src/index.crates.io/ring-0.17.14/src/ec/suite_b/ecdsa/signing.rs";
__attribute__((used)) const char rustls_panic[] =
    "/cargo/registry/src/index.crates.io/rustls-0.23.31/src/crypto/signer.rs";

int CRYPTO_refcount_dec_and_test_zero(int *count) {
    return __atomic_sub_fetch(count, 1, __ATOMIC_ACQ_REL) == 0;
}

void EVP_PKEY_free(struct pkey *k) {
    if (k == 0)
        return;
    if (!CRYPTO_refcount_dec_and_test_zero(&k->references))
        return;
    k->data = 0;
}

int EVP_DigestSignInit(void *ctx, void **pctx, const void *type, void *e, struct pkey *k) {
    (void)pctx, (void)type, (void)e;
    return ctx != 0 && k != 0;
}

int EVP_DigestSign(void *ctx, unsigned char *sig, unsigned long *siglen,
                   const unsigned char *tbs, unsigned long tbslen) {
    (void)ctx, (void)tbs;
    if (sig == 0 || siglen == 0)
        return 0;
    *siglen = tbslen;
    return 1;
}

int EVP_PKEY_sign(void *ctx, unsigned char *sig, unsigned long *siglen,
                  const unsigned char *tbs, unsigned long tbslen) {
    (void)ctx, (void)sig, (void)tbs;
    if (siglen != 0)
        *siglen = tbslen + 1;
    return 2;
}

/* AWS-LC prefixes every symbol with its version. */
int aws_lc_EVP_DigestSign(void *ctx, unsigned char *sig, unsigned long *siglen,
                          const unsigned char *tbs, unsigned long tbslen)
    __asm__("aws_lc_0_47_0_EVP_DigestSign");
int aws_lc_EVP_DigestSign(void *ctx, unsigned char *sig, unsigned long *siglen,
                          const unsigned char *tbs, unsigned long tbslen) {
    (void)ctx, (void)sig, (void)tbs;
    if (siglen != 0)
        *siglen = tbslen + 2;
    return 3;
}

/* BoringSSL's C++ namespace tells it apart from OpenSSL. */
void bssl_marker(void) __asm__("_ZN4bssl10SSL_CONFIGD2Ev");
void bssl_marker(void) {}

/* ring's ECDSA signer and a rustls Signer, in legacy Rust mangling. */
int ring_ecdsa_sign(int x)
    __asm__("_ZN4ring2ec7suite_b5ecdsa7signing12EcdsaKeyPair4sign17h0123456789abcdefE");
int ring_ecdsa_sign(int x) { return x + 4; }

int rustls_sign(int x)
    __asm__("_ZN90_$LT$rustls..crypto..ring..sign..EcdsaSigner$u20$as$u20$rustls..crypto..signer..Signer$GT$4sign17h0123456789abcdefE");
int rustls_sign(int x) { return x + 5; }
