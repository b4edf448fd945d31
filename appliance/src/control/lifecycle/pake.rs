//! The join key never crosses the wire: a join is a SPAKE2 exchange (password-authenticated
//! key exchange) over the key's argon2id output, sans-IO.
//!
//! ```text
//!  joiner                                             member (holds the mesh's argon2id hash)
//!    Join {}                        ───────────────►   split_verifier: params + salt, password P
//!                                   ◄───────────────   JoinAnswer { key_params, pake: B }
//!    P = argon2id(key, params)   (join-check worker)
//!    A, session = joiner_respond(P, B)
//!    Join { pake: A, confirm: session.confirmation(JOINER) } ──►  member_finish: checks it
//!                                   ◄───────────────   JoinAnswer { confirm: session.confirmation(MEMBER),
//!                                                                   sealed: session.seal(mesh, members) }
//!    checks the member's confirmation, opens the grant
//! ```
//!
//! What each side learns from a failed attempt is one wrong guess: an impostor at the member's
//! address (or a man in the middle of the guest link's self-signed TLS) gets no hash to attack
//! offline, cannot tell the joiner anything it would accept (it cannot make the member's
//! confirmation without P), and never sees the grant (the mesh secret), which is sealed under
//! the session key. A joiner without the key learns nothing but "wrong key". Members do hold P
//! (the hash in the mesh config): to answer joins they must, and they hold the mesh secret,
//! which is more.
#![forbid(unsafe_code)]

use argon2::{
    Argon2, Params,
    password_hash::{PasswordHash, PasswordHasher},
};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce, aead::Aead};
use rand::{CryptoRng, RngCore};
use spake2::{Ed25519Group, Identity, Password, Spake2};

/// SPAKE2's identity of the joining side.
const JOINER: &[u8] = b"meshd joiner";
/// SPAKE2's identity of the answering member.
const MEMBER: &[u8] = b"meshd member";

/// The most argon2 memory a joiner spends on a member's parameters (KiB): the parameters come
/// from whoever answers at the address, so they are capped (the default is 19 MiB).
pub const MAX_MEMORY_KIB: u32 = 256 * 1024;
/// The largest argon2 time cost accepted (the default is 2).
pub const MAX_TIME_COST: u32 = 16;
/// The largest argon2 parallelism accepted (the default is 1).
pub const MAX_LANES: u32 = 8;

/// What went wrong in a join exchange. The messages go back to the other side or to the
/// operator; they carry nothing secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PakeError {
    /// The member's key parameters are malformed, not argon2id, or too costly.
    #[error("unusable join key parameters")]
    Params,
    /// A SPAKE2 message that is not one.
    #[error("malformed key exchange message")]
    Protocol,
    /// The other side does not know the same key.
    #[error("wrong join key")]
    WrongKey,
    /// The sealed grant does not open.
    #[error("the sealed answer does not open")]
    Sealed,
}

/// A member's stored argon2id hash, split into what it tells a joiner (algorithm, parameters,
/// salt) and the password both sides run SPAKE2 with (the hash output).
pub fn split_verifier(hash: &str) -> Result<(String, Vec<u8>), PakeError> {
    let parsed = PasswordHash::new(hash).map_err(|_| PakeError::Params)?;
    let output = parsed.hash.ok_or(PakeError::Params)?;
    let params = PasswordHash {
        hash: None,
        ..parsed.clone()
    }
    .to_string();
    Ok((params, output.as_bytes().to_vec()))
}

/// The joiner's password: argon2id of its key under the member's parameters, refused when
/// they are not argon2id or cost more than the caps.
pub fn derive_password(key: &str, params: &str) -> Result<Vec<u8>, PakeError> {
    let parsed = PasswordHash::new(params).map_err(|_| PakeError::Params)?;
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return Err(PakeError::Params);
    }
    let cost = Params::try_from(&parsed).map_err(|_| PakeError::Params)?;
    if cost.m_cost() > MAX_MEMORY_KIB || cost.t_cost() > MAX_TIME_COST || cost.p_cost() > MAX_LANES
    {
        return Err(PakeError::Params);
    }
    let salt = parsed.salt.ok_or(PakeError::Params)?;
    let hashed = Argon2::default()
        .hash_password_customized(
            key.as_bytes(),
            Some(parsed.algorithm),
            parsed.version,
            cost,
            salt,
        )
        .map_err(|_| PakeError::Params)?;
    Ok(hashed.hash.ok_or(PakeError::Params)?.as_bytes().to_vec())
}

/// The member's half-finished exchange, kept until the joiner's answer.
pub struct MemberPake(Spake2<Ed25519Group>);

impl std::fmt::Debug for MemberPake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberPake")
    }
}

/// The member starts: its state and the message for the joiner.
pub fn member_start(
    password: &[u8],
    rng: &mut (impl CryptoRng + RngCore),
) -> (MemberPake, Vec<u8>) {
    let (state, message) = Spake2::<Ed25519Group>::start_b_with_rng(
        &Password::new(password),
        &Identity::new(JOINER),
        &Identity::new(MEMBER),
        rng,
    );
    (MemberPake(state), message)
}

/// The joiner answers the member's message: its own message and the session.
pub fn joiner_respond(
    password: &[u8],
    member_message: &[u8],
    rng: &mut (impl CryptoRng + RngCore),
) -> Result<(Vec<u8>, Session), PakeError> {
    let (state, message) = Spake2::<Ed25519Group>::start_a_with_rng(
        &Password::new(password),
        &Identity::new(JOINER),
        &Identity::new(MEMBER),
        rng,
    );
    let key = state
        .finish(member_message)
        .map_err(|_| PakeError::Protocol)?;
    Ok((message, Session::new(&key)))
}

/// The member finishes: the session, once the joiner's confirmation proved the same key.
pub fn member_finish(
    state: MemberPake,
    joiner_message: &[u8],
    confirmation: &[u8],
) -> Result<Session, PakeError> {
    // A message that is not a point says nothing but "not the key".
    let key = state
        .0
        .finish(joiner_message)
        .map_err(|_| PakeError::WrongKey)?;
    let session = Session::new(&key);
    if !session.confirms(Side::Joiner, confirmation) {
        return Err(PakeError::WrongKey);
    }
    Ok(session)
}

/// Which side a confirmation comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The joining node.
    Joiner,
    /// The answering member.
    Member,
}

/// The shared key of one completed exchange.
pub struct Session {
    key: [u8; 32],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

impl Session {
    fn new(spake_key: &[u8]) -> Self {
        Self {
            key: blake3::derive_key("meshd join session v1", spake_key),
        }
    }

    /// What `side` sends to prove it holds the session key (so, the password).
    pub fn confirmation(&self, side: Side) -> [u8; 32] {
        let label: &[u8] = match side {
            Side::Joiner => JOINER,
            Side::Member => MEMBER,
        };
        *blake3::keyed_hash(&self.key, label).as_bytes()
    }

    /// Whether `received` is `side`'s confirmation (constant time).
    pub fn confirms(&self, side: Side, received: &[u8]) -> bool {
        let expected = self.confirmation(side);
        received.len() == expected.len()
            && expected
                .iter()
                .zip(received)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&blake3::derive_key("meshd join grant v1", &self.key).into())
    }

    /// `plaintext` sealed under the session (a random 24-byte nonce, then the ciphertext).
    pub fn seal(&self, plaintext: &[u8], rng: &mut (impl CryptoRng + RngCore)) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let mut sealed = nonce.to_vec();
        // Encrypting into a Vec cannot fail for sizes far below the AEAD's limit.
        sealed.extend(
            self.cipher()
                .encrypt(XNonce::from_slice(&nonce), plaintext)
                .unwrap_or_default(),
        );
        sealed
    }

    /// Opens what [`Self::seal`] sealed.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, PakeError> {
        if sealed.len() < 24 {
            return Err(PakeError::Sealed);
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        self.cipher()
            .decrypt(XNonce::from_slice(nonce), ciphertext)
            .map_err(|_| PakeError::Sealed)
    }
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::SaltString;
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn verifier(key: &str) -> String {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        Argon2::default()
            .hash_password(key.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    /// Runs an exchange: the member holds `stored`'s verifier, the joiner types `typed`.
    fn exchange(stored: &str, typed: &str) -> Result<(Session, Session), PakeError> {
        let mut rng = StdRng::seed_from_u64(7);
        let (params, member_password) = split_verifier(&verifier(stored))?;
        let (state, member_message) = member_start(&member_password, &mut rng);
        let joiner_password = derive_password(typed, &params)?;
        let (joiner_message, joiner) = joiner_respond(&joiner_password, &member_message, &mut rng)?;
        let member = member_finish(state, &joiner_message, &joiner.confirmation(Side::Joiner))?;
        Ok((joiner, member))
    }

    #[test]
    fn the_right_key_gives_both_sides_one_session_and_the_grant_opens() {
        let (joiner, member) = exchange("correct horse", "correct horse").unwrap();
        assert!(joiner.confirms(Side::Member, &member.confirmation(Side::Member)));
        let mut rng = StdRng::seed_from_u64(1);
        let sealed = member.seal(b"mesh secret inside", &mut rng);
        assert_eq!(joiner.open(&sealed).unwrap(), b"mesh secret inside");
        let mut tampered = sealed.clone();
        tampered[30] ^= 1;
        assert_eq!(joiner.open(&tampered), Err(PakeError::Sealed));
        assert_eq!(joiner.open(&sealed[..10]), Err(PakeError::Sealed));
    }

    #[test]
    fn a_wrong_key_is_refused_and_nothing_crosses_that_reveals_the_key() {
        assert_eq!(
            exchange("correct horse", "wrong horse").unwrap_err(),
            PakeError::WrongKey
        );
        // The parameters a joiner sees hold the salt, not the hash.
        let (params, password) = split_verifier(&verifier("correct horse")).unwrap();
        let encoded: String = password.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!params.contains(&encoded));
        assert!(PasswordHash::new(&params).unwrap().hash.is_none());
    }

    #[test]
    fn an_impostor_without_the_password_cannot_confirm_as_the_member() {
        let mut rng = StdRng::seed_from_u64(3);
        let (params, _) = split_verifier(&verifier("correct horse")).unwrap();
        // The impostor guesses a password.
        let (_, impostor_message) = member_start(b"a guess", &mut rng);
        let joiner_password = derive_password("correct horse", &params).unwrap();
        let (_, joiner) = joiner_respond(&joiner_password, &impostor_message, &mut rng).unwrap();
        let impostor_session = Session::new(b"whatever the impostor computes");
        assert!(!joiner.confirms(Side::Member, &impostor_session.confirmation(Side::Member)));
        // Junk instead of a SPAKE2 message.
        assert_eq!(
            joiner_respond(&joiner_password, &[1, 2, 3], &mut rng).unwrap_err(),
            PakeError::Protocol
        );
        let (state, _) = member_start(b"p", &mut rng);
        assert_eq!(
            member_finish(state, &[9; 33], &[0; 32]).unwrap_err(),
            PakeError::WrongKey
        );
    }

    #[test]
    fn hostile_parameters_are_refused_before_any_work() {
        let honest = split_verifier(&verifier("k")).unwrap().0;
        let greedy = honest.replacen("m=19456", "m=4194304", 1);
        assert_ne!(greedy, honest);
        assert_eq!(derive_password("k", &greedy), Err(PakeError::Params));
        let slow = honest.replacen("t=2", "t=1000", 1);
        assert_eq!(derive_password("k", &slow), Err(PakeError::Params));
        let other = honest.replacen("argon2id", "argon2i", 1);
        assert_eq!(derive_password("k", &other), Err(PakeError::Params));
        assert_eq!(derive_password("k", "not params"), Err(PakeError::Params));
        assert_eq!(split_verifier("not a hash"), Err(PakeError::Params));
    }
}
