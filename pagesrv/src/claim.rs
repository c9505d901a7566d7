//! Whose session a new connection opens, resumes or joins: the rules that keep a session
//! to the destination that opened it (`common::auth`, "Resumption"), as plain functions
//! over what the manager knows of a VM.
//!
//! ```text
//!  urgent Hello{session S}:
//!    S is the VM's connecting session ─ proves its secret? ─yes─► Resume S (replace it)
//!                                                          └no──► Unproven (refused, nothing changes)
//!    S is the VM's established session ─ proves its secret? ─yes─► Resume S (take it over)
//!                                                           └no──► Unproven
//!    the VM has a session (running, connecting, or cut off and
//!      waiting for its destination) ──────────────────────────────► Busy
//!    else ───────────────────────────────────────────────────────► Open (S adopted if not 0)
//!  bulk Hello{session S}: joins the VM's connecting session S only, proving its secret
//!  extra bulk Hello{session S}: joins the VM's running session S only, proving its secret
//! ```
//!
//! A template (a stored snapshot, or `--template`) is restored by any number of
//! destinations at once, each in a session of its own: a `Hello` naming one of them is
//! claimed by these same rules against that session ([`template_session`]), any other
//! opens a new one. Nothing a restore does ends the template or another restore.
//!
//! A session cut off stays its destination's until the migration ends: nobody else may
//! start one for the VM meanwhile (it could declare it complete, or failed, while the real
//! destination runs the guest). A destination that died for good needs a pagesrv restart.
//! A restarted pagesrv knows no secret: the first destination to name a VM's session (or a
//! new one) takes it. With keys per VM that is a holder of that VM's key.

use common::auth::ResumeSecret;
use common::wire::{SessionParams, VmName};

/// A session the manager knows, with the secret its connections prove.
#[derive(Debug, Clone)]
pub struct Known {
    /// The session's id.
    pub id: u64,
    /// Its resume secret.
    pub secret: ResumeSecret,
}

/// Whose session an urgent connection opens or resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The VM's session, its secret proven: the connection takes its place and keeps it.
    Resume {
        /// The session.
        id: u64,
        /// Its secret (unchanged).
        secret: ResumeSecret,
    },
    /// A new session: under the id the destination named (a session this pagesrv never
    /// knew, e.g. after a restart), or a fresh one (`None`).
    Open {
        /// The id to adopt.
        adopt: Option<u64>,
    },
    /// The VM has another session (running, connecting, or cut off).
    Busy,
    /// Names the VM's session without proving its secret.
    Unproven,
}

/// What an urgent `Hello` naming session `wanted` gets, given the VM's connecting session
/// (`pending`), the session it established (`established`, running or cut off), whether a
/// session runs, and whether the connection proves a given secret.
pub fn claim(
    wanted: u64,
    pending: Option<&Known>,
    established: Option<&Known>,
    running: bool,
    proves: impl Fn(&ResumeSecret) -> bool,
) -> Claim {
    let resume_or_refuse = |known: &Known| {
        if proves(&known.secret) {
            Claim::Resume {
                id: known.id,
                secret: known.secret.clone(),
            }
        } else {
            Claim::Unproven
        }
    };
    if let Some(pending) = pending.filter(|p| p.id == wanted) {
        // Its own urgent connection again (the bulk one never came, or was cut).
        return resume_or_refuse(pending);
    }
    if let Some(established) = established.filter(|e| e.id == wanted) {
        return match resume_or_refuse(established) {
            Claim::Resume { .. } if pending.is_some() => Claim::Busy,
            claim => claim,
        };
    }
    if running || pending.is_some() || established.is_some() {
        return Claim::Busy;
    }
    Claim::Open {
        adopt: (wanted != 0).then_some(wanted),
    }
}

/// Which of a template's sessions (each given as its connecting and its established
/// session) an urgent `Hello` naming session `wanted` concerns: the one with that id, to be
/// claimed by [`claim`] (resumed only with its secret), or `None`: the connection opens a
/// session of its own.
pub fn template_session<'a>(
    wanted: u64,
    sessions: impl IntoIterator<Item = (Option<&'a Known>, Option<&'a Known>)>,
) -> Option<usize> {
    if wanted == 0 {
        return None;
    }
    sessions.into_iter().position(|(pending, established)| {
        pending.is_some_and(|p| p.id == wanted) || established.is_some_and(|e| e.id == wanted)
    })
}

/// Whether a bulk `Hello` belongs to the session welcomed with `welcome`: same session, same
/// layout, same VM name (its secret is checked apart).
pub fn joins(welcome: &SessionParams, hello: &SessionParams) -> bool {
    welcome.session_id == hello.session_id
        && welcome.page_size == hello.page_size
        && welcome.total_pages == hello.total_pages
        && welcome.vm == hello.vm
}

/// The refusal of a connection to a VM another session holds: it names no session.
pub fn busy_text(vm: VmName) -> String {
    format!(
        "VM {vm} is being migrated to another destination (or its connection is being made); try again when it ends"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::auth::{Psk, Transcript};
    use common::wire::{PROTOCOL_VERSION, Role};

    fn secret(n: u8) -> ResumeSecret {
        let t = Transcript {
            server_nonce: [n; 32],
            client_nonce: [n; 32],
            role: Role::Urgent,
            hello: SessionParams {
                version: PROTOCOL_VERSION,
                page_size: 4096,
                total_pages: 8,
                session_id: 0,
                image_id: 0,
                flags: 0,
                vm: VmName::default(),
            },
        };
        Psk::unkeyed().resume_secret(&t, u64::from(n))
    }

    fn known(id: u64, n: u8) -> Known {
        Known {
            id,
            secret: secret(n),
        }
    }

    #[test]
    fn test_a_session_is_resumed_only_with_its_secret() {
        let established = known(7, 1);
        let proving = |s: &ResumeSecret| *s == secret(1);
        let guessing = |_: &ResumeSecret| false;
        for running in [true, false] {
            assert_eq!(
                claim(7, None, Some(&established), running, proving),
                Claim::Resume {
                    id: 7,
                    secret: secret(1)
                },
                "running: {running}"
            );
            assert_eq!(
                claim(7, None, Some(&established), running, guessing),
                Claim::Unproven,
                "the id alone is nothing"
            );
        }
        // Another secret (another session's, or one made up) proves nothing either.
        let other = |s: &ResumeSecret| *s == secret(2);
        assert_eq!(
            claim(7, None, Some(&established), true, other),
            Claim::Unproven
        );
    }

    #[test]
    fn test_strangers_find_the_vm_busy_and_open_only_when_it_is_free() {
        let established = known(7, 1);
        let nobody = |_: &ResumeSecret| false;
        assert_eq!(
            claim(0, None, Some(&established), true, nobody),
            Claim::Busy
        );
        assert_eq!(
            claim(9, None, Some(&established), true, nobody),
            Claim::Busy
        );
        let pending = known(8, 3);
        assert_eq!(
            claim(0, Some(&pending), Some(&established), false, nobody),
            Claim::Busy,
            "a destination is connecting"
        );
        // The established session broke off: it stays its destination's, for no one else
        // to start another (and forge its end) meanwhile.
        assert_eq!(
            claim(0, None, Some(&established), false, nobody),
            Claim::Busy
        );
        assert_eq!(
            claim(9, None, Some(&established), false, nobody),
            Claim::Busy
        );
        // A restarted pagesrv adopts the session a destination names.
        assert_eq!(
            claim(42, None, None, false, nobody),
            Claim::Open { adopt: Some(42) }
        );
    }

    #[test]
    fn test_a_connecting_session_is_replaced_by_its_own_destination_only() {
        let pending = known(8, 3);
        let established = known(7, 1);
        let own = |s: &ResumeSecret| *s == secret(3);
        assert_eq!(
            claim(8, Some(&pending), None, false, own),
            Claim::Resume {
                id: 8,
                secret: secret(3)
            }
        );
        assert_eq!(
            claim(8, Some(&pending), None, false, |_| false),
            Claim::Unproven
        );
        // The established session's destination while another one connects: busy.
        let old = |s: &ResumeSecret| *s == secret(1);
        assert_eq!(
            claim(7, Some(&pending), Some(&established), false, old),
            Claim::Busy
        );
    }

    #[test]
    fn test_a_template_opens_a_session_per_destination_and_resumes_each_with_its_secret() {
        let (a, b, c) = (known(7, 1), known(8, 2), known(9, 3));
        // Restore a runs, b connects, c broke off and waits for its destination.
        let sessions = [(None, Some(&a)), (Some(&b), None), (None, Some(&c))];
        // Strangers (no session named, or one nobody has) open sessions of their own.
        assert_eq!(template_session(0, sessions), None);
        assert_eq!(template_session(42, sessions), None);
        // A named session is claimed against that session only, by the usual rules.
        for (wanted, at, secret_of) in [(7, 0, 1), (8, 1, 2), (9, 2, 3)] {
            let at_found = template_session(wanted, sessions).expect("named");
            assert_eq!(at_found, at);
            let (pending, established) = sessions[at];
            let proving = |s: &ResumeSecret| *s == secret(secret_of);
            assert!(
                matches!(claim(wanted, pending, established, at == 0, proving), Claim::Resume { id, .. } if id == wanted)
            );
            // Another restore's secret proves nothing: no restore takes over another.
            let other = |s: &ResumeSecret| *s == secret(secret_of % 3 + 1);
            assert_eq!(
                claim(wanted, pending, established, at == 0, other),
                Claim::Unproven
            );
        }
    }

    #[test]
    fn test_bulk_joins_its_own_session_and_layout() {
        let welcome = SessionParams {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            total_pages: 8,
            session_id: 5,
            image_id: 1,
            flags: 0,
            vm: VmName::new("a").unwrap(),
        };
        assert!(joins(&welcome, &welcome));
        for other in [
            SessionParams {
                session_id: 6,
                ..welcome
            },
            SessionParams {
                total_pages: 9,
                ..welcome
            },
            SessionParams {
                vm: VmName::new("b").unwrap(),
                ..welcome
            },
        ] {
            assert!(!joins(&welcome, &other));
        }
        assert!(!busy_text(VmName::new("a").unwrap()).contains('5'));
    }
}
