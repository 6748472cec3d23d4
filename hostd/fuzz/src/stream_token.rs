//! Capability tokens (`hostd::stream::token`): decoding any text never panics and never
//! accepts what this key did not sign; a token issued for any environment, rights and
//! expiry verifies to exactly those claims before its expiry and is refused at it and for
//! another incarnation of the environment; changing any one character of it makes it fail.
//!
//! Input: rights (1 byte), expiry (u64le), environment uid (u64le), name length (1 byte),
//! the name, the position (u16le) and xor mask (1 byte) of the one-character change, then
//! arbitrary text decoded as a token.

use hostd::stream::token::{EnvRef, TokenError, TokenKey};
use proto::stream::Rights;

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = data.split_at_checked(n)?;
    *data = tail;
    Some(head)
}

/// The target body: see the module documentation.
pub fn run(data: &[u8]) {
    let key = TokenKey::from_bytes(&[7; 32]);
    let mut rest = data;
    let (Some(rights), Some(expiry), Some(uid), Some(name_len)) = (
        take(&mut rest, 1),
        take(&mut rest, 8),
        take(&mut rest, 8),
        take(&mut rest, 1),
    ) else {
        return;
    };
    let Some(name) = take(&mut rest, usize::from(name_len[0])) else {
        return;
    };
    let (Some(pos), Some(mask)) = (take(&mut rest, 2), take(&mut rest, 1)) else {
        return;
    };
    let garbage = String::from_utf8_lossy(rest);
    assert!(
        key.decode(&garbage).is_err(),
        "accepted a token it never signed: {garbage:?}"
    );

    let Some(rights) = Rights::from_bits(rights[0]) else {
        return;
    };
    let expires = u64::from_le_bytes(expiry.try_into().unwrap());
    let env = EnvRef::new(
        String::from_utf8_lossy(name),
        u64::from_le_bytes(uid.try_into().unwrap()),
    );
    let token = key
        .issue_expiring_at(&env, rights, expires)
        .expect("issue a token");

    if let Some(before) = expires.checked_sub(1) {
        let claims = key
            .verify_at(&token, &env, before)
            .expect("a fresh token verifies");
        assert_eq!(
            (&claims.env, claims.rights, claims.expires_unix),
            (&env, rights, expires)
        );
    }
    assert_eq!(
        key.verify_at(&token, &env, expires),
        Err(TokenError::Expired(0))
    );
    let later = EnvRef::new(env.name.clone(), env.uid.wrapping_add(1));
    if let Some(before) = expires.checked_sub(1) {
        assert!(matches!(
            key.verify_at(&token, &later, before),
            Err(TokenError::StaleEnvironment(_))
        ));
    }

    let mut changed = token.clone().into_bytes();
    let at = usize::from(u16::from_le_bytes([pos[0], pos[1]])) % changed.len();
    changed[at] ^= mask[0].max(1) & 0x7f;
    if let Ok(changed) = String::from_utf8(changed) {
        if changed != token {
            assert!(
                key.decode(&changed).is_err(),
                "{changed:?} accepted for {token:?}"
            );
        }
    }
}
