//! The conversation of each connection as a state machine, one per side and role. Every frame
//! a side receives goes through its machine first, so a frame in the wrong phase is refused
//! by construction (the decoder already refuses handshake frames in a session and the
//! reverse; these machines refuse the rest, e.g. a `Request` before `MapEnd`, a second
//! `BulkDone`, `Digests` nobody asked for).
//!
//! ```text
//!  handshake, server:  AwaitHello ─Hello─► AwaitProof ─Proof─► Admitted
//!  handshake, client:  AwaitServer ─Challenge─► AwaitAuthOk ─AuthOk─► AwaitWelcome ─Welcome─► Welcomed
//!                                                                      any ─Error─► Refused
//!  urgent, source:     Maps ─MapEnd─► Serving ─DigestQuery─► Verifying ─Goodbye─► Closed
//!                      (DoneMap, SkipMap)  (Request, Skip,    Serving ─Goodbye─► Closed (--no-verify)
//!                                           final maps)
//!  urgent, destination: Serving ─(sends DigestQuery)─► AwaitDigests ─Digests─► Verified
//!                      (PageRun, ZeroRun)            (late PageRun, ZeroRun)
//!  bulk, destination:  [Precopy ─Switchover─►] Pushing ─BulkDone─► Pushed    bulk, source: Open
//!                      (PageRun, ZeroRun,           (PageRun, ZeroRun,         (Synced, DoneMap)
//!                       Discard, Patch, Sync,         PageHashes, Sync)
//!                       PageHashes)
//!  every session phase takes Heartbeat and stays; Error ends every phase (Closed/Refused).
//! ```

use super::{Kind, WireError};

/// A phase of one connection's conversation.
pub trait Phase: Copy + std::fmt::Debug {
    /// The phase after receiving a frame of `kind`, or `None` if the frame does not belong.
    fn next(self, kind: Kind) -> Option<Self>;

    /// A short name for errors and logs.
    fn name(self) -> &'static str;

    /// Moves to the phase after receiving a frame of `kind`.
    ///
    /// # Errors
    /// [`WireError::OutOfPhase`] when the frame does not belong in this phase; the phase is
    /// unchanged.
    fn receive(&mut self, kind: Kind) -> Result<(), WireError> {
        match self.next(kind) {
            Some(next) => {
                *self = next;
                Ok(())
            }
            None => Err(WireError::OutOfPhase {
                kind,
                phase: self.name(),
            }),
        }
    }
}

/// pagesrv's side of a connection's handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHandshake {
    /// Waiting for `Hello`.
    AwaitHello,
    /// `Challenge` sent; waiting for `Proof`.
    AwaitProof,
    /// The client is admitted to the session stage (the server answers next).
    Admitted,
    /// The client gave up.
    Closed,
}

impl Phase for ServerHandshake {
    fn next(self, kind: Kind) -> Option<Self> {
        use ServerHandshake::*;
        Some(match (self, kind) {
            (AwaitHello, Kind::Hello) => AwaitProof,
            (AwaitProof, Kind::Proof) => Admitted,
            (AwaitHello | AwaitProof, Kind::Error) => Closed,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ServerHandshake::AwaitHello => "waiting for Hello",
            ServerHandshake::AwaitProof => "waiting for the key proof",
            ServerHandshake::Admitted => "admitted",
            ServerHandshake::Closed => "closed",
        }
    }
}

/// faultd's side of a connection's handshake (after sending `Hello`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientHandshake {
    /// Waiting for `Challenge` (or a refusal).
    AwaitServer,
    /// `Proof` sent; waiting for the server's proof.
    AwaitAuthOk,
    /// The server proved the key; its answer follows.
    AwaitWelcome,
    /// Welcomed: the session stage begins.
    Welcomed,
    /// The server refused.
    Refused,
}

impl Phase for ClientHandshake {
    fn next(self, kind: Kind) -> Option<Self> {
        use ClientHandshake::*;
        Some(match (self, kind) {
            (AwaitServer, Kind::Challenge) => AwaitAuthOk,
            (AwaitAuthOk, Kind::AuthOk) => AwaitWelcome,
            (AwaitWelcome, Kind::Welcome) => Welcomed,
            (AwaitServer | AwaitAuthOk | AwaitWelcome, Kind::Error) => Refused,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ClientHandshake::AwaitServer => "waiting for Challenge",
            ClientHandshake::AwaitAuthOk => "waiting for the server's key proof",
            ClientHandshake::AwaitWelcome => "waiting for Welcome",
            ClientHandshake::Welcomed => "welcomed",
            ClientHandshake::Refused => "refused",
        }
    }
}

/// pagesrv's side of a session's urgent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceUrgent {
    /// Receiving the destination's done and skip maps; the push waits.
    Maps,
    /// Answering requests while the push runs.
    Serving,
    /// Digests sent; waiting for the verdict.
    Verifying,
    /// Goodbye or Error received.
    Closed,
}

impl Phase for SourceUrgent {
    fn next(self, kind: Kind) -> Option<Self> {
        use SourceUrgent::*;
        Some(match (self, kind) {
            (Closed, _) => return None,
            (phase, Kind::Heartbeat) => phase,
            (_, Kind::Error) => Closed,
            (Maps, Kind::DoneMap | Kind::SkipMap) => Maps,
            (Maps, Kind::MapEnd) => Serving,
            // Requests and skips; and, once every page is there, the final maps.
            (Serving, Kind::Request | Kind::Skip | Kind::DoneMap | Kind::SkipMap) => Serving,
            (Serving, Kind::DigestQuery) => Verifying,
            (Serving | Verifying, Kind::Goodbye) => Closed,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SourceUrgent::Maps => "receiving the destination's page maps",
            SourceUrgent::Serving => "serving requests",
            SourceUrgent::Verifying => "waiting for the verdict",
            SourceUrgent::Closed => "closed",
        }
    }
}

/// pagesrv's side of a session's bulk connection: the destination sends nothing but
/// heartbeats, answers to `Sync` and the maps of pages its base image holds (or an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceBulk {
    /// Pushing.
    Open,
    /// The destination reported an error.
    Closed,
}

impl Phase for SourceBulk {
    fn next(self, kind: Kind) -> Option<Self> {
        match (self, kind) {
            (SourceBulk::Open, Kind::Heartbeat | Kind::Synced | Kind::DoneMap) => {
                Some(SourceBulk::Open)
            }
            (SourceBulk::Open, Kind::Error) => Some(SourceBulk::Closed),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SourceBulk::Open => "pushing",
            SourceBulk::Closed => "closed",
        }
    }
}

/// faultd's side of a session's urgent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestUrgent {
    /// Requests out, replies in.
    Serving,
    /// `DigestQuery` sent: late replies, then the digests.
    AwaitDigests,
    /// Digests received.
    Verified,
    /// The source reported an error.
    Closed,
}

impl DestUrgent {
    /// Moves to the phase after sending a frame of `kind` (only `DigestQuery` changes it).
    ///
    /// # Errors
    /// [`WireError::OutOfPhase`] for a `DigestQuery` outside [`DestUrgent::Serving`].
    pub fn send(&mut self, kind: Kind) -> Result<(), WireError> {
        match (*self, kind) {
            (DestUrgent::Serving, Kind::DigestQuery) => *self = DestUrgent::AwaitDigests,
            (_, Kind::DigestQuery) => {
                return Err(WireError::OutOfPhase {
                    kind,
                    phase: self.name(),
                });
            }
            _ => {}
        }
        Ok(())
    }
}

impl Phase for DestUrgent {
    fn next(self, kind: Kind) -> Option<Self> {
        use DestUrgent::*;
        Some(match (self, kind) {
            (Closed, _) => return None,
            (phase, Kind::Heartbeat) => phase,
            (_, Kind::Error) => Closed,
            (Serving | AwaitDigests, Kind::PageRun | Kind::ZeroRun) => self,
            (AwaitDigests, Kind::Digests) => Verified,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            DestUrgent::Serving => "serving faults",
            DestUrgent::AwaitDigests => "waiting for digests",
            DestUrgent::Verified => "verified",
            DestUrgent::Closed => "closed",
        }
    }
}

/// faultd's side of a session's bulk connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestBulk {
    /// Precopy rounds arrive while the source runs (pages, and discards of pages written
    /// since they were sent), until `Switchover`.
    Precopy,
    /// Pushed pages arrive.
    Pushing,
    /// `BulkDone` received.
    Pushed,
    /// The source reported an error.
    Closed,
}

impl Phase for DestBulk {
    fn next(self, kind: Kind) -> Option<Self> {
        use DestBulk::*;
        Some(match (self, kind) {
            (Closed, _) => return None,
            (phase, Kind::Heartbeat) => phase,
            (_, Kind::Error) => Closed,
            (Precopy, Kind::PageRun | Kind::ZeroRun | Kind::Discard | Kind::Patch | Kind::Sync) => {
                Precopy
            }
            (Precopy, Kind::Switchover) => Pushing,
            (Pushing, Kind::PageRun | Kind::ZeroRun) => Pushing,
            // A destination with a base image: hashes first, then a sync (either stage).
            (Precopy | Pushing, Kind::PageHashes | Kind::Sync) => self,
            (Pushing, Kind::BulkDone) => Pushed,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            DestBulk::Precopy => "receiving precopy rounds",
            DestBulk::Pushing => "receiving pushed pages",
            DestBulk::Pushed => "push complete",
            DestBulk::Closed => "closed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<P: Phase>(mut phase: P, kinds: &[Kind]) -> Result<P, WireError> {
        for &kind in kinds {
            phase.receive(kind)?;
        }
        Ok(phase)
    }

    #[test]
    fn test_source_urgent_follows_the_session_order() {
        use Kind::*;
        let ok = run(
            SourceUrgent::Maps,
            &[
                DoneMap,
                SkipMap,
                Heartbeat,
                MapEnd,
                Request,
                Skip,
                Heartbeat,
                DoneMap,
                SkipMap,
                DigestQuery,
                Goodbye,
            ],
        );
        assert_eq!(ok, Ok(SourceUrgent::Closed));
        assert_eq!(
            run(SourceUrgent::Maps, &[MapEnd, Goodbye]),
            Ok(SourceUrgent::Closed)
        );
    }

    #[test]
    fn test_source_urgent_refuses_out_of_order_frames() {
        use Kind::*;
        for (before, bad) in [
            (&[][..], Request),
            (&[][..], DigestQuery),
            (&[][..], Goodbye),
            (&[MapEnd, DigestQuery][..], DoneMap),
            (&[MapEnd][..], MapEnd),
            (&[MapEnd, DigestQuery][..], Request),
            (&[MapEnd, DigestQuery][..], DigestQuery),
            (&[MapEnd, Goodbye][..], Heartbeat),
            (&[MapEnd][..], PageRun),
            (&[MapEnd][..], Hello),
        ] {
            let mut phase = run(SourceUrgent::Maps, before).unwrap();
            let was = phase;
            let err = phase.receive(bad).unwrap_err();
            assert!(
                matches!(err, WireError::OutOfPhase { kind, .. } if kind == bad),
                "{bad:?} after {before:?}: {err}"
            );
            assert_eq!(phase, was, "a refused frame leaves the phase unchanged");
        }
    }

    #[test]
    fn test_destination_machines() {
        use Kind::*;
        let mut urgent = DestUrgent::Serving;
        assert!(urgent.receive(Digests).is_err(), "digests nobody asked for");
        urgent.receive(PageRun).unwrap();
        urgent.send(DigestQuery).unwrap();
        assert!(urgent.send(DigestQuery).is_err());
        urgent.receive(ZeroRun).unwrap();
        urgent.receive(Digests).unwrap();
        assert_eq!(urgent, DestUrgent::Verified);
        assert!(urgent.receive(PageRun).is_err());
        assert!(urgent.receive(Digests).is_err());

        let bulk = run(DestBulk::Pushing, &[PageRun, Heartbeat, ZeroRun, BulkDone]);
        assert_eq!(bulk, Ok(DestBulk::Pushed));
        assert!(run(DestBulk::Pushed, &[PageRun]).is_err());
        assert!(run(DestBulk::Pushed, &[BulkDone]).is_err());
        assert!(run(DestBulk::Pushing, &[Request]).is_err());
        assert_eq!(run(DestBulk::Pushing, &[Error]), Ok(DestBulk::Closed));
        assert!(run(SourceBulk::Open, &[PageRun]).is_err());
        assert_eq!(
            run(
                DestBulk::Precopy,
                &[
                    PageRun, Discard, Sync, ZeroRun, Switchover, PageRun, BulkDone
                ]
            ),
            Ok(DestBulk::Pushed)
        );
        assert!(
            run(DestBulk::Precopy, &[BulkDone]).is_err(),
            "no end before the switch"
        );
        assert!(
            run(DestBulk::Pushing, &[Discard]).is_err(),
            "no discard after it"
        );
        assert!(run(DestBulk::Pushing, &[Switchover]).is_err());
        assert!(
            run(DestBulk::Pushed, &[Sync]).is_err(),
            "nothing to sync after the push"
        );
        assert_eq!(
            run(DestBulk::Pushing, &[PageHashes, Sync, PageRun, BulkDone]),
            Ok(DestBulk::Pushed)
        );
        assert!(run(DestBulk::Pushed, &[PageHashes]).is_err());
        // Patches (huge pages in precopy) only before the switch.
        assert!(
            run(
                DestBulk::Precopy,
                &[PageRun, Patch, Sync, Patch, Switchover]
            )
            .is_ok()
        );
        assert!(run(DestBulk::Pushing, &[Patch]).is_err());
        assert_eq!(
            run(SourceBulk::Open, &[DoneMap, Synced, Heartbeat]),
            Ok(SourceBulk::Open)
        );
        assert!(run(SourceBulk::Open, &[Sync]).is_err());
    }

    #[test]
    fn test_handshake_machines() {
        use Kind::*;
        assert_eq!(
            run(ServerHandshake::AwaitHello, &[Hello, Proof]),
            Ok(ServerHandshake::Admitted)
        );
        assert_eq!(
            run(ServerHandshake::AwaitHello, &[Hello]),
            Ok(ServerHandshake::AwaitProof),
            "a proof is always needed"
        );
        assert!(run(ServerHandshake::AwaitHello, &[Proof]).is_err());
        assert!(run(ServerHandshake::AwaitHello, &[Hello, Hello]).is_err());
        assert_eq!(
            run(ClientHandshake::AwaitServer, &[Challenge, AuthOk, Welcome]),
            Ok(ClientHandshake::Welcomed)
        );
        assert!(
            run(ClientHandshake::AwaitServer, &[Welcome]).is_err(),
            "never welcomed without the server's proof"
        );
        assert_eq!(
            run(ClientHandshake::AwaitServer, &[Challenge, AuthOk, Error]),
            Ok(ClientHandshake::Refused)
        );
        assert!(run(ClientHandshake::AwaitServer, &[AuthOk]).is_err());
        assert!(run(ClientHandshake::AwaitServer, &[Challenge, Welcome]).is_err());
    }
}
