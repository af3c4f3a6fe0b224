//! The closed sets of the kill-switch actions (`rotate`, `revoke`): how
//! far a rule may go on its own (`Mode`), and the RFC 5280 revocation
//! reasons. Rules, configuration and `keywarden revoke` read them here.

use serde::{Deserialize, Serialize};

/// How far a `rotate` or `revoke` goes when a rule fires. The sensor's
/// configuration sets the most any rule may do; a rule may ask for less.
/// Ordered from the most cautious.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Plan only, change nothing: the event says what would be done.
    DryRun,
    /// Record the action for an operator to confirm with
    /// `keywarden actions approve ID`.
    Approve,
    /// Carry it out at once.
    Enforce,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::DryRun, Mode::Approve, Mode::Enforce];

    pub fn name(self) -> &'static str {
        match self {
            Mode::DryRun => "dry_run",
            Mode::Approve => "approve",
            Mode::Enforce => "enforce",
        }
    }

    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The more cautious of the two: a rule never goes past the
    /// configuration.
    pub fn within(self, ceiling: Mode) -> Mode {
        self.min(ceiling)
    }
}

/// RFC 5280 §5.3.1 reason codes, by the names RFC 5280 gives them.
pub const REVOKE_REASONS: &[(&str, u8)] = &[
    ("unspecified", 0),
    ("keyCompromise", 1),
    ("cACompromise", 2),
    ("affiliationChanged", 3),
    ("superseded", 4),
    ("cessationOfOperation", 5),
    ("certificateHold", 6),
    ("privilegeWithdrawn", 9),
    ("aACompromise", 10),
];

/// The reason a rule's `revoke` gives when it names none: a rule fires on
/// misuse.
pub const DEFAULT_REVOKE_REASON: &str = "keyCompromise";

/// The RFC 5280 name (as spelled there) and code of a reason, matched
/// without regard to case.
pub fn revoke_reason(name: &str) -> Option<(&'static str, u8)> {
    REVOKE_REASONS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .copied()
}

/// The reasons, for an error message.
pub fn revoke_reason_names() -> String {
    REVOKE_REASONS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_never_goes_past_the_configuration() {
        assert_eq!(Mode::Enforce.within(Mode::Approve), Mode::Approve);
        assert_eq!(Mode::DryRun.within(Mode::Enforce), Mode::DryRun);
        assert_eq!(Mode::Approve.within(Mode::DryRun), Mode::DryRun);
        for m in Mode::ALL {
            assert_eq!(Mode::from_name(m.name()), Some(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
    }

    #[test]
    fn reasons_are_found_by_any_case_and_keep_their_rfc_spelling() {
        assert_eq!(revoke_reason("KEYCOMPROMISE"), Some(("keyCompromise", 1)));
        assert_eq!(
            revoke_reason("privilegeWithdrawn"),
            Some(("privilegeWithdrawn", 9))
        );
        assert_eq!(revoke_reason("removeFromCRL"), None);
        assert!(revoke_reason(DEFAULT_REVOKE_REASON).is_some());
    }
}
