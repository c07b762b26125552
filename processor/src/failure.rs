//! Why a queue message cannot be finished in a round. Typed, so that tests, logs and metrics
//! tell the causes apart, and so that what may poison a message is decided in one place.

use infra::storage::{ErrorKind, Refusal, StorageError};

/// The step of a round that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Keeping an unreadable message whole in the quarantine queue.
    Quarantine,
    /// Writing readings to the telemetry table.
    Write,
    /// Registering a device in the device table.
    Register,
    /// Marking device-hours written after their hour ended, for the rollup keeper.
    Rollup,
    /// Writing dead-letter records.
    DeadLetter,
    /// Judging readings against the alarm rules.
    Alarm,
}

impl Stage {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Quarantine => "quarantine",
            Stage::Write => "write",
            Stage::Register => "register",
            Stage::Rollup => "rollup",
            Stage::DeadLetter => "dead_letter",
            Stage::Alarm => "alarm",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Failure {
    /// A storage call failed, or the round's time ran out before it answered.
    Storage { stage: Stage, error: StorageError },
    /// A table write waited past the round's deadline for a permit, or its group of the
    /// round was not begun by then: this processor took more than it could write in time,
    /// which says nothing about the message.
    NoWritePermit,
    /// A transaction was refused for a reason that blames none of its operations.
    Refused {
        stage: Stage,
        table: String,
        refusal: Refusal,
    },
    /// A dead-letter record fitted no queue message (ruled out by the record's shortening,
    /// and handled all the same: its message stays).
    Unpacked,
    /// The message came back while the put of its dead letters, begun in an earlier delivery,
    /// is still running: it waits for that put's outcome rather than writing them twice.
    DeadLettersInFlight,
}

impl Failure {
    pub fn stage(&self) -> Stage {
        match self {
            Failure::Storage { stage, .. } | Failure::Refused { stage, .. } => *stage,
            Failure::NoWritePermit => Stage::Write,
            Failure::Unpacked | Failure::DeadLettersInFlight => Stage::DeadLetter,
        }
    }

    /// The storage refused what the request carried (one entity's content).
    pub fn blames_content(&self) -> bool {
        match self {
            Failure::Storage { error, .. } => error.is_content_error(),
            Failure::Refused { refusal, .. } => matches!(refusal, Refusal::Content(_)),
            Failure::NoWritePermit | Failure::Unpacked | Failure::DeadLettersInFlight => false,
        }
    }

    /// Only the operator can fix it (a credential without a right, a missing table): the
    /// message stays, readiness names the error, and the fetcher slows down.
    pub fn needs_operator(&self) -> bool {
        match self {
            Failure::Storage { error, .. } => error.needs_operator(),
            // One entity's content: held back on its own (`Ctx::refused_device`), not a
            // reason to slow every round down.
            Failure::Refused {
                refusal: Refusal::Content(_) | Refusal::Transient(_),
                ..
            } => false,
            Failure::Refused { .. } => true,
            Failure::NoWritePermit | Failure::Unpacked | Failure::DeadLettersInFlight => false,
        }
    }

    /// Whether a message still failing this way on its last delivery may be given up as
    /// `poison` (its device messages dead-lettered whole, so a replay restores them). Only
    /// for transient failures to write its readings: never for the operator's problems (no
    /// reading is to blame); never for a failed registration (the message's rows may be
    /// written already, and deleting it before its device has a row would hide them from the
    /// archiver for good); never for a failed quarantine (the record keeps only part of an
    /// unreadable message's text); never for a write that waited past the round's deadline
    /// for a permit, which says this processor took more than it could write in time, not
    /// that the message cannot be written: under overload every message would reach its
    /// delivery limit that way (the fetcher takes less after such a round).
    pub fn may_poison(&self) -> bool {
        !self.needs_operator()
            && self.stage() == Stage::Write
            && !matches!(self, Failure::NoWritePermit)
    }

    /// The round's time ran out first: waiting for a write permit, or retrying past its
    /// deadline.
    pub fn out_of_time(&self) -> bool {
        matches!(
            self,
            Failure::NoWritePermit
                | Failure::Storage {
                    error: StorageError {
                        kind: ErrorKind::OutOfTime,
                        ..
                    },
                    ..
                }
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Storage { stage, error } => write!(f, "{}: {error}", stage.as_str()),
            Failure::Refused {
                stage,
                table,
                refusal,
            } => write!(f, "{}: table {table} {refusal}", stage.as_str()),
            Failure::NoWritePermit => {
                f.write_str("write: no write permit before the round's deadline")
            }
            Failure::Unpacked => f.write_str("a dead-letter record could not be packed"),
            Failure::DeadLettersInFlight => {
                f.write_str("its dead letters are being written already (an earlier delivery's put has not ended)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(stage: Stage, status: u16, code: &str) -> Failure {
        Failure::Storage {
            stage,
            error: StorageError {
                op: "table_upsert",
                kind: ErrorKind::Status {
                    status,
                    code: code.into(),
                    message: String::new(),
                },
            },
        }
    }

    #[test]
    fn only_transient_failures_outside_registration_may_poison() {
        assert!(storage(Stage::Write, 503, "ServerBusy").may_poison());
        assert!(!storage(Stage::Write, 403, "AuthorizationFailure").may_poison());
        assert!(!storage(Stage::Write, 404, "TableNotFound").may_poison());
        assert!(!storage(Stage::Register, 503, "ServerBusy").may_poison());
        let refused = Failure::Refused {
            stage: Stage::Write,
            table: "t".into(),
            refusal: Refusal::Refused(409),
        };
        assert!(refused.needs_operator() && !refused.may_poison());
        assert!(!storage(Stage::Quarantine, 500, "InternalError").may_poison());
    }

    #[test]
    fn waiting_past_the_deadline_for_a_write_permit_never_poisons() {
        // Seen under overload: every round waited past its deadline for a write permit, and
        // messages reached their delivery limit without a single storage error.
        let late = |op| Failure::Storage {
            stage: Stage::Write,
            error: StorageError {
                op,
                kind: ErrorKind::OutOfTime,
            },
        };
        let waited = Failure::NoWritePermit;
        assert!(waited.out_of_time() && !waited.may_poison() && !waited.needs_operator());
        // A write still retrying at the deadline is storage's slowness, as before.
        let retrying = late("table_upsert");
        assert!(retrying.out_of_time() && retrying.may_poison());
        let timeout = Failure::Storage {
            stage: Stage::Write,
            error: StorageError {
                op: "table_upsert",
                kind: ErrorKind::Timeout(std::time::Duration::from_secs(30)),
            },
        };
        assert!(
            timeout.may_poison(),
            "a storage call that never answers still may"
        );
    }
}
