//! Tokens and roles.
//!
//! A connection's role is decided once, by the token in its HELLO. Tokens
//! come from the environment (never the command line, where `ps` shows
//! them); there is no built-in default. `--insecure` (no tokens at all)
//! grants every connection the admin role, for local experiments only.

use stampede_protocol::message::Role;

#[derive(Clone)]
pub struct Tokens {
    pub admin: Option<Vec<u8>>,
    pub checkout: Option<Vec<u8>>,
    /// The reconciler's token: the log operations only.
    pub replication: Option<Vec<u8>>,
    pub insecure: bool,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.debug_struct("Tokens")
            .field("admin", &self.admin.as_ref().map(|_| "<set>"))
            .field("checkout", &self.checkout.as_ref().map(|_| "<set>"))
            .field("replication", &self.replication.as_ref().map(|_| "<set>"))
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// Compare without an early exit, so response timing does not reveal how
/// many leading bytes of a guess were right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// The role a token grants; `Role::None` means refused.
    pub fn role_for(&self, token: &[u8]) -> Role {
        if self.insecure {
            return Role::Admin;
        }
        if self.admin.as_deref().is_some_and(|t| constant_time_eq(t, token)) {
            return Role::Admin;
        }
        if self.checkout.as_deref().is_some_and(|t| constant_time_eq(t, token)) {
            return Role::Checkout;
        }
        if self.replication.as_deref().is_some_and(|t| constant_time_eq(t, token)) {
            return Role::Replication;
        }
        Role::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let tokens = Tokens {
            admin: Some(b"a".to_vec()),
            checkout: Some(b"c".to_vec()),
            replication: Some(b"r".to_vec()),
            insecure: false,
        };
        assert_eq!(tokens.role_for(b"a"), Role::Admin);
        assert_eq!(tokens.role_for(b"c"), Role::Checkout);
        assert_eq!(tokens.role_for(b"r"), Role::Replication);
        assert_eq!(tokens.role_for(b""), Role::None);
        assert_eq!(tokens.role_for(b"ab"), Role::None);
    }
}
