//! Training: sampled clients train and upload; verified updates are folded as they arrive.
//!
//! Per drawn client a slot moves `Assigned → Uploading → Folding → Ended(Accepted)`, or ends
//! early with another [`ParticipantOutcome`] (reported failure, dropout, late, refused). An
//! upload's header is checked here before any byte is staged; the staged, digest-verified
//! update is folded into the fixed-point sum on a
//! blocking thread, one fold at a time (the sum has one owner), while this loop keeps serving
//! requests. The phase ends at the deadline, or earlier once every slot is final, after the
//! folds already committed have finished.
//!
//! In a secure round ([`super::secure`]) the phase first runs advertising and sharing, takes only
//! masked uploads from sharers once sharing closed, folds them into the protocol core's ring sum
//! (each weighing 1), and hands over to unmasking instead of aggregating.

use std::collections::{BTreeMap, VecDeque};

use fedtune_shared::compression::UpdateEncoding;
use fedtune_shared::ids::{ClientId, RoundId, Sha256};
use fedtune_shared::round::{ClientActivity, PhaseName, TaskKind, UpdateHeader, UploadReceipt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::aggregating::Aggregating;
use super::failure::Failure;
use super::secure::{SecureRound, SecureStep};
use super::shutdown::Shutdown;
use super::unmasking::Unmasking;
use crate::aggregate::{FixedPointSum, MAX_TOTAL_WEIGHT};
use crate::error::RoundError;
use crate::outcome::{AttemptFailure, Lateness, ParticipantOutcome, Refusal};
use crate::round::phase::{Closed, Phase, Shared};
use crate::round::requests::{Envelope, Reply, Request, UploadTicket};
use crate::round::Round;
use crate::spool::StagedUpdate;
use crate::storage::ClientOutcome;
use crate::strategy::{FitFailure, FitSummary, RoundContext, UpdateWeighting, UploadStats};
use fedtune_shared::secagg::{Aggregator, MaskedInput};

/// Where a drawn client stands.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Task assigned, nothing received.
    Assigned,
    /// An upload with this id is streaming.
    Uploading(u64),
    /// Verified, waiting for or in its fold.
    Folding,
    /// Over: folded, or ended without contributing.
    Ended(ParticipantOutcome),
}

impl Slot {
    fn is_final(&self) -> bool {
        matches!(self, Slot::Ended(_))
    }

    /// How the slot counts once training is over. Training ends only when every slot is final or
    /// the deadline closed the open ones, so the open arms are a safety net: an open slot did
    /// not contribute.
    fn outcome(&self) -> ParticipantOutcome {
        match self {
            Slot::Ended(o) => o.clone(),
            Slot::Assigned => ParticipantOutcome::Late(Lateness::NoUpdate),
            Slot::Uploading(_) => ParticipantOutcome::Late(Lateness::UploadIncomplete),
            Slot::Folding => ParticipantOutcome::FoldFailed,
        }
    }
}

/// A verified update waiting for its fold.
#[derive(Debug)]
struct PendingFold {
    ticket: UploadTicket,
    staged: StagedUpdate,
    weighting: UpdateWeighting,
    reply: Reply<UploadReceipt>,
}

/// The fold running on a blocking thread; it hands the sum back when done.
type FoldJoin = JoinHandle<(FixedPointSum, PendingFold, std::io::Result<()>)>;

/// A masked input's fold into the ring sum on a blocking thread; it hands the aggregator back.
type SecureFoldJoin = JoinHandle<(Aggregator, PendingFold, Result<(), RoundError>)>;

/// Collecting and folding the updates of one round.
#[derive(Debug)]
pub(crate) struct Training {
    id: RoundId,
    /// What the strategy configured the round with (handed back at each weighting and at
    /// aggregation).
    context: RoundContext,
    deadline: Instant,
    slots: BTreeMap<ClientId, Slot>,
    /// The running sum; `None` while a fold has it.
    sum: Option<FixedPointSum>,
    queue: VecDeque<PendingFold>,
    folding: Option<FoldJoin>,
    /// Weight of everything folded or queued (bounded by `MAX_TOTAL_WEIGHT`).
    committed_weight: u64,
    accepted: Vec<FitSummary>,
    deadline_passed: bool,
    /// Set if a fold failed: the sum can no longer be trusted and the attempt fails.
    poisoned: Option<AttemptFailure>,
    /// The secure part of a secure round (`None`: a plain round).
    secure: Option<SecureRound>,
    secure_folding: Option<SecureFoldJoin>,
    /// A secure step closed below the threshold: the attempt ends now.
    secure_failed: bool,
}

impl Training {
    /// Training for the round configured as `context` with the drawn clients, ending at
    /// `deadline`.
    pub(crate) fn new(
        context: RoundContext,
        selected: Vec<ClientId>,
        deadline: Instant,
        secure: Option<SecureRound>,
    ) -> Self {
        Self {
            id: context.round(),
            context,
            deadline,
            slots: selected.into_iter().map(|c| (c, Slot::Assigned)).collect(),
            sum: None,
            queue: VecDeque::new(),
            folding: None,
            committed_weight: 0,
            accepted: Vec::new(),
            deadline_passed: false,
            poisoned: None,
            secure,
            secure_folding: None,
            secure_failed: false,
        }
    }

    fn done(&self) -> bool {
        let settled = self.deadline_passed || self.secure_failed || self.slots.values().all(Slot::is_final);
        settled && self.folding.is_none() && self.secure_folding.is_none() && self.queue.is_empty()
    }

    fn end_slot(&mut self, shared: &mut Shared, client: &ClientId, outcome: ParticipantOutcome) {
        if let Some(slot) = self.slots.get_mut(client) {
            debug!(client = %client, %outcome, "participant failed");
            *slot = Slot::Ended(outcome);
        }
        if shared.tasks.remove(client).is_some() {
            shared.events.tasks_changed();
        }
    }

    fn on_deadline(&mut self, shared: &mut Shared) {
        self.deadline_passed = true;
        let open: Vec<(ClientId, Slot)> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Assigned | Slot::Uploading(_)))
            .map(|(c, s)| (c.clone(), s.clone()))
            .collect();
        for (c, s) in open {
            let late = match s {
                Slot::Uploading(_) => Lateness::UploadIncomplete,
                _ => Lateness::NoUpdate,
            };
            self.end_slot(shared, &c, ParticipantOutcome::Late(late));
        }
        info!(
            late = self.slots.values().filter(|s| matches!(s, Slot::Ended(o) if o.is_late())).count(),
            "round deadline passed"
        );
    }

    fn check_liveness(&mut self, shared: &mut Shared) {
        let now = Instant::now();
        let silent: Vec<ClientId> = self
            .slots
            .iter()
            .filter(|(c, s)| **s == Slot::Assigned && !shared.registry.is_alive(c, now))
            .map(|(c, _)| c.clone())
            .collect();
        for c in silent {
            warn!(client = %c, "selected client went silent; counted as a dropout");
            self.end_slot(shared, &c, ParticipantOutcome::Dropped);
        }
    }

    /// Whether `client` may upload in this attempt now: selected, its task open (not ended,
    /// not already accepted), the deadline not passed. What `ReserveUpload` checks before it
    /// takes a slot, and the upload's header again. An upload in progress passes: its stream
    /// may have broken off before the release reached here, and its header is refused then.
    fn check_uploader(&self, shared: &Shared, client: &ClientId) -> Result<(), RoundError> {
        let id = self.id;
        let slot = self
            .slots
            .get(client)
            .ok_or_else(|| RoundError::NotSelected { client: client.clone(), round: id })?;
        if self.deadline_passed {
            return Err(RoundError::Late { round: id, deadline: shared.settings.rounds.deadline });
        }
        match slot {
            Slot::Assigned | Slot::Uploading(_) => Ok(()),
            Slot::Folding | Slot::Ended(ParticipantOutcome::Accepted) => {
                Err(RoundError::Duplicate { client: client.clone(), round: id })
            }
            Slot::Ended(outcome) => {
                Err(RoundError::TaskOver { client: client.clone(), round: id, reason: outcome.to_string() })
            }
        }
    }

    fn begin(
        &mut self,
        shared: &mut Shared,
        client: ClientId,
        header: UpdateHeader,
        masked: Option<[u8; 32]>,
    ) -> Result<UploadTicket, RoundError> {
        let id = self.id;
        match (&self.secure, &masked) {
            (Some(_), None) => {
                return Err(RoundError::WrongEncoding(
                    "this round runs secure aggregation: it takes masked_u32 uploads only".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(RoundError::WrongEncoding(
                    "masked_u32 uploads belong to secure rounds; this round is plain".into(),
                ))
            }
            _ => {}
        }
        self.check_uploader(shared, &client)?;
        if let Some(Slot::Uploading(_)) = self.slots.get(&client) {
            return Err(RoundError::UploadInProgress { client, round: id });
        }
        if header.base_version != shared.model.version {
            return Err(RoundError::WrongBaseVersion {
                round: id,
                got: header.base_version,
                expected: shared.model.version,
            });
        }
        let layout = &shared.model.layout;
        let expected_digest = Sha256(layout.trainable.digest());
        if header.manifest_digest != expected_digest {
            return Err(RoundError::ManifestMismatch {
                expected: expected_digest,
                got: header.manifest_digest,
            });
        }
        // A plain round takes the encoding its fit tasks asked for, nothing else: the bytes of
        // one encoding must never be folded as the other. (A masked header has its own type.)
        let wanted = shared.settings.fit.update_encoding;
        if masked.is_none() && header.encoding != wanted {
            return Err(RoundError::WrongEncoding(format!(
                "`{}` does not fit this round, whose fit tasks ask for `{wanted}` (fit.update_encoding)",
                header.encoding
            )));
        }
        let values = layout.trainable.byte_len() / 4;
        let expected =
            if masked.is_some() { values as u64 * 4 } else { header.encoding.payload_bytes(values) };
        if header.total_bytes > expected {
            return Err(RoundError::TooLarge { size: header.total_bytes, limit: expected });
        }
        if header.total_bytes < expected {
            return Err(RoundError::SizeMismatch { announced: header.total_bytes, expected });
        }
        if let (Some(secure), Some(context)) = (&self.secure, &masked) {
            secure.check_masked_upload(&client, context)?;
        }
        let cap = self.weight_cap(shared);
        if header.num_examples > cap {
            return Err(RoundError::WeightOverCap { weight: header.num_examples, cap });
        }
        if self.committed_weight + header.num_examples > MAX_TOTAL_WEIGHT {
            return Err(RoundError::TooManyExamples { weight: header.num_examples, limit: MAX_TOTAL_WEIGHT });
        }
        shared.next_upload_id += 1;
        let upload_id = shared.next_upload_id;
        self.slots.insert(client.clone(), Slot::Uploading(upload_id));
        shared.registry.touch(&client, Some(ClientActivity::Uploading), Instant::now());
        Ok(UploadTicket { upload_id, round: id, client, header, masked, deadline: self.deadline })
    }

    /// The most weight one update may carry: the configured maximum, and an even share of the
    /// fixed-point bound on the round's total, so that every participant's update fits however
    /// much the others claim (n updates of at most ⌊bound / n⌋ never exceed the bound).
    fn weight_cap(&self, shared: &Shared) -> u64 {
        let share = MAX_TOTAL_WEIGHT / self.slots.len().max(1) as u64;
        share.min(shared.settings.server.max_update_weight)
    }

    fn commit(
        &mut self,
        shared: &mut Shared,
        ticket: UploadTicket,
        staged: StagedUpdate,
        reply: Reply<UploadReceipt>,
    ) {
        let client = ticket.client.clone();
        let refuse = |reply: Reply<UploadReceipt>, e: RoundError| {
            let _ = reply.send(Err(e));
        };
        match self.slots.get(&client) {
            Some(Slot::Uploading(u)) if *u == ticket.upload_id => {}
            Some(Slot::Ended(outcome)) if outcome.is_late() => {
                return refuse(
                    reply,
                    RoundError::Late { round: self.id, deadline: shared.settings.rounds.deadline },
                )
            }
            Some(Slot::Ended(outcome)) if !outcome.is_accepted() => {
                let reason = outcome.to_string();
                return refuse(reply, RoundError::TaskOver { client, round: self.id, reason });
            }
            _ => return refuse(reply, RoundError::Duplicate { client, round: self.id }),
        }
        let stats = UploadStats {
            client: client.clone(),
            num_examples: ticket.header.num_examples,
            l2_norm: staged.l2_norm(),
        };
        // A secure round is unweighted: the ring sum carries no per-client weights (a weight
        // would have to be applied by the client, unverifiable under the masks), and under DP
        // the denominator is the fixed n̄ anyway. Every survivor counts once.
        let weighting = if self.secure.is_some() {
            Ok(UpdateWeighting { weight: 1, scale: 1.0 })
        } else {
            let strategy = shared.strategy.lock().unwrap_or_else(|p| p.into_inner());
            strategy.update_weighting(&self.context, &stats)
        };
        let weighting = match weighting {
            Ok(w) if w.weight >= 1 && w.scale > 0.0 && w.scale <= 1.0 => w,
            Ok(w) => {
                warn!(?w, "strategy returned an invalid weighting");
                self.end_slot(shared, &client, ParticipantOutcome::Refused(Refusal::InvalidWeighting));
                return refuse(reply, RoundError::Internal("invalid update weighting".into()));
            }
            Err(e) => {
                self.end_slot(shared, &client, ParticipantOutcome::Refused(Refusal::Strategy(e.to_string())));
                return refuse(reply, RoundError::Refused(e.to_string()));
            }
        };
        let cap = self.weight_cap(shared);
        if weighting.weight > cap {
            self.end_slot(shared, &client, ParticipantOutcome::Refused(Refusal::TooManyExamples));
            return refuse(reply, RoundError::WeightOverCap { weight: weighting.weight, cap });
        }
        if self.committed_weight + weighting.weight > MAX_TOTAL_WEIGHT {
            self.end_slot(shared, &client, ParticipantOutcome::Refused(Refusal::TooManyExamples));
            return refuse(
                reply,
                RoundError::TooManyExamples { weight: weighting.weight, limit: MAX_TOTAL_WEIGHT },
            );
        }
        self.committed_weight += weighting.weight;
        self.slots.insert(client, Slot::Folding);
        self.queue.push_back(PendingFold { ticket, staged, weighting, reply });
        self.start_next_fold();
    }

    fn start_next_fold(&mut self) {
        if self.secure.is_some() {
            return self.start_next_secure_fold();
        }
        if self.folding.is_some() {
            return;
        }
        let Some(sum) = self.sum.take() else { return };
        let Some(pending) = self.queue.pop_front() else {
            self.sum = Some(sum);
            return;
        };
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
        self.folding = Some(tokio::task::spawn_blocking(move || {
            let mut sum = sum;
            let w = pending.weighting;
            let path = pending.staged.path();
            let started = tokio::time::Instant::now();
            let r = match pending.ticket.header.encoding {
                UpdateEncoding::F32 => sum.fold_file(path, w.weight, w.scale, threads),
                UpdateEncoding::Int8 => sum.fold_int8_file(path, w.weight, w.scale, threads),
            };
            if r.is_ok() {
                crate::telemetry::folded(pending.staged.bytes(), started.elapsed());
            }
            (sum, pending, r)
        }));
    }

    fn fold_done(
        &mut self,
        shared: &mut Shared,
        res: Result<(FixedPointSum, PendingFold, std::io::Result<()>), tokio::task::JoinError>,
    ) {
        self.folding = None;
        match res {
            Ok((sum, pending, Ok(()))) => {
                self.sum = Some(sum);
                let client = pending.ticket.client.clone();
                self.slots.insert(client.clone(), Slot::Ended(ParticipantOutcome::Accepted));
                shared.tasks.remove(&client);
                shared.accepted_updates += 1;
                self.accepted.push(FitSummary {
                    client: client.clone(),
                    num_examples: pending.ticket.header.num_examples,
                    weight: pending.weighting.weight,
                    // Under DP only what the mechanism noises is kept (see `mechanism_metrics`).
                    metrics: if shared.settings.privacy.enabled() {
                        fedtune_shared::privacy::mechanism_metrics(&pending.ticket.header.metrics)
                    } else {
                        pending.ticket.header.metrics.clone()
                    },
                });
                info!(client = %client, examples = pending.ticket.header.num_examples, "update folded");
                let receipt = UploadReceipt { id: self.id, received_bytes: pending.staged.bytes() };
                let _ = pending.reply.send(Ok(receipt));
            }
            Ok((sum, pending, Err(e))) => {
                // The sum may hold part of this update: nothing folded into it can be trusted.
                self.sum = Some(sum);
                warn!(cause = %e, "fold failed; the attempt will fail");
                self.poisoned = Some(AttemptFailure::FoldFailed(e.to_string()));
                let client = pending.ticket.client.clone();
                self.end_slot(shared, &client, ParticipantOutcome::FoldFailed);
                let _ = pending.reply.send(Err(RoundError::Internal(e.to_string())));
            }
            Err(e) => {
                warn!(cause = %e, "fold task died; the attempt will fail");
                self.poisoned = Some(AttemptFailure::FoldTaskDied(e.to_string()));
                // The sum went down with the task: refuse everything still queued, and count the
                // update that was folding (the task took its reply along) as not folded.
                for p in self.queue.drain(..) {
                    let _ = p.reply.send(Err(RoundError::Internal("aggregation failed".into())));
                }
                let folding: Vec<ClientId> =
                    self.slots.iter().filter(|(_, s)| **s == Slot::Folding).map(|(c, _)| c.clone()).collect();
                for c in folding {
                    self.end_slot(shared, &c, ParticipantOutcome::FoldFailed);
                }
            }
        }
        self.start_next_fold();
    }

    /// Folds the next masked input into the ring sum on a blocking thread. The payload is read
    /// whole (4·d bytes, the size of one plain chunked update) and handed to the core, which
    /// refuses it without changing the sum if it is not acceptable; the staged file is deleted
    /// when the fold ends (dropping `StagedUpdate`), so no individual masked vector outlives it.
    fn start_next_secure_fold(&mut self) {
        if self.secure_folding.is_some() {
            return;
        }
        let Some(secure) = self.secure.as_mut() else { return };
        if self.queue.is_empty() {
            return;
        }
        let Some(mut agg) = secure.take_aggregator() else { return };
        let pending = self.queue.pop_front().expect("checked non-empty");
        let Some(sender) = secure.context().slot_of(&pending.ticket.client) else {
            secure.put_aggregator(agg);
            let _ = pending.reply.send(Err(RoundError::Internal("sender left the roster".into())));
            return;
        };
        self.secure_folding = Some(tokio::task::spawn_blocking(move || {
            let started = tokio::time::Instant::now();
            let r = std::fs::read(pending.staged.path())
                .map_err(|e| RoundError::Internal(format!("reading a staged masked input: {e}")))
                .and_then(|bytes| {
                    MaskedInput::from_payload(sender, &bytes).ok_or_else(|| {
                        RoundError::Protocol("a masked payload is a whole number of u32".into())
                    })
                })
                .and_then(|input| agg.accept_masked_input(input).map_err(RoundError::from));
            if r.is_ok() {
                crate::telemetry::folded(pending.staged.bytes(), started.elapsed());
            }
            (agg, pending, r)
        }));
    }

    fn secure_fold_done(
        &mut self,
        shared: &mut Shared,
        res: Result<(Aggregator, PendingFold, Result<(), RoundError>), tokio::task::JoinError>,
    ) {
        self.secure_folding = None;
        match res {
            Ok((agg, pending, r)) => {
                if let Some(secure) = self.secure.as_mut() {
                    secure.put_aggregator(agg);
                }
                let client = pending.ticket.client.clone();
                let bytes = pending.staged.bytes();
                // The staged masked vector is deleted here, whatever the outcome.
                drop(pending.staged);
                match r {
                    Ok(()) => {
                        self.slots.insert(client.clone(), Slot::Ended(ParticipantOutcome::Accepted));
                        shared.accepted_updates += 1;
                        self.accepted.push(FitSummary {
                            client: client.clone(),
                            num_examples: pending.ticket.header.num_examples,
                            weight: 1,
                            // Metrics travel in the clear beside the masked vector: under DP only
                            // what the mechanism noises is kept, as in a plain round.
                            metrics: if shared.settings.privacy.enabled() {
                                fedtune_shared::privacy::mechanism_metrics(&pending.ticket.header.metrics)
                            } else {
                                pending.ticket.header.metrics.clone()
                            },
                        });
                        info!(client = %client, "masked input folded");
                        let _ = pending.reply.send(Ok(UploadReceipt { id: self.id, received_bytes: bytes }));
                    }
                    Err(e) => {
                        // The core refused it and left the sum as it was.
                        warn!(client = %client, cause = %e, "masked input refused");
                        self.end_slot(shared, &client, ParticipantOutcome::FoldFailed);
                        let _ = pending.reply.send(Err(e));
                    }
                }
            }
            Err(e) => {
                warn!(cause = %e, "secure fold task died; the attempt will fail");
                self.poisoned = Some(AttemptFailure::FoldTaskDied(e.to_string()));
                self.secure_failed = true;
                for p in self.queue.drain(..) {
                    let _ = p.reply.send(Err(RoundError::Internal("aggregation failed".into())));
                }
            }
        }
        self.start_next_fold();
    }

    /// Closes the open advertising or sharing step; the clients that missed it leave the round.
    fn close_secure_step(&mut self, shared: &mut Shared) {
        let Some(secure) = self.secure.as_mut() else { return };
        let before = secure.step();
        match secure.close_step() {
            Ok(()) => {
                let missed: Vec<ClientId> = self
                    .slots
                    .iter()
                    .filter(|(c, s)| !s.is_final() && !secure.still_in(c))
                    .map(|(c, _)| c.clone())
                    .collect();
                let what = match before {
                    SecureStep::Advertising { .. } => "advertise its keys",
                    _ => "share",
                };
                info!(step = what, left_out = missed.len(), "secure step closed");
                for c in missed {
                    self.end_slot(shared, &c, ParticipantOutcome::Failed(format!("did not {what} in time")));
                }
            }
            Err(e) => {
                warn!(cause = %e, "secure step closed below the threshold; the attempt fails");
                self.poisoned = Some(AttemptFailure::SecureAggregation(e.to_string()));
                self.secure_failed = true;
            }
        }
        // Waiters learn the step's outcome (or the attempt's end) at once.
        shared.events.tasks_changed();
    }

    /// Closes the open step early once every client still in the round has done it.
    fn maybe_close_secure_step(&mut self, shared: &mut Shared) {
        let complete = match &self.secure {
            Some(secure) if secure.step_deadline().is_some() => {
                secure.step_complete(self.slots.iter().filter(|(_, s)| !s.is_final()).map(|(c, _)| c))
            }
            _ => false,
        };
        if complete {
            self.close_secure_step(shared);
        }
    }

    fn on_secure_request(&mut self, shared: &mut Shared, req: Request) -> Option<Request> {
        let Some(secure) = self.secure.as_mut() else { return Some(req) };
        match req {
            Request::AdvertiseKeys(client, msg, reply) => {
                shared.registry.touch(&client, None, Instant::now());
                let out = secure.advertise(&client, msg);
                let _ = reply.send(out);
                self.maybe_close_secure_step(shared);
            }
            Request::SendShares(client, msg, reply) => {
                shared.registry.touch(&client, None, Instant::now());
                let out = secure.share(&client, msg);
                let _ = reply.send(out);
                self.maybe_close_secure_step(shared);
            }
            Request::AwaitSecAggStep(client, round, step, reply) => {
                shared.registry.touch(&client, None, Instant::now());
                let ended = self
                    .slots
                    .get(&client)
                    .is_some_and(|s| s.is_final() && !matches!(s, Slot::Ended(ParticipantOutcome::Accepted)));
                let out = if ended && secure.check_round(&client, round).is_ok() {
                    let reason = self.slots[&client].outcome().to_string();
                    Err(RoundError::AttemptEnded { round: self.id, client, reason })
                } else {
                    secure.step_input(&client, round, step)
                };
                let _ = reply.send(out);
            }
            Request::AnswerUnmask(client, msg, reply) => {
                let out = secure.check_round(&client, msg.round).and_then(|()| {
                    Err(RoundError::SecureStep {
                        round: self.id,
                        reason: "unmasking has not started: masked uploads are still being taken".into(),
                    })
                });
                let _ = reply.send(out);
            }
            other => return Some(other),
        }
        None
    }

    async fn on_request(&mut self, shared: &mut Shared, env: Envelope) {
        let (req, span) = env;
        let req = {
            let _g = span.enter();
            match self.on_secure_request(shared, req) {
                Some(req) => req,
                None => return,
            }
        };
        match req {
            Request::BeginUpload(client, header, masked, reply) if header.id == self.id => {
                let _g = span.enter();
                let out = self.begin(shared, client, header, masked);
                if let Err(e) = &out {
                    debug!(cause = %e, "upload refused at its header");
                }
                let _ = reply.send(out);
            }
            Request::CheckUpload(client, id, reply) if id == self.id => {
                shared.registry.touch(&client, None, Instant::now());
                let _ = reply.send(self.check_uploader(shared, &client).map(|()| self.deadline));
            }
            Request::CommitUpload(ticket, staged, reply) if ticket.round == self.id => {
                let _g = span.enter();
                self.commit(shared, ticket, staged, reply);
            }
            Request::AbortUpload(ticket) if ticket.round == self.id => {
                if self.slots.get(&ticket.client) == Some(&Slot::Uploading(ticket.upload_id)) {
                    // The client may try again before the deadline.
                    self.slots.insert(ticket.client, Slot::Assigned);
                }
            }
            Request::ReportFailure(client, report, reply)
                if report.kind == TaskKind::Fit
                    && report.id == self.id
                    && self.slots.contains_key(&client) =>
            {
                shared.registry.touch(&client, Some(ClientActivity::Idle), Instant::now());
                if matches!(self.slots.get(&client), Some(Slot::Assigned | Slot::Uploading(_))) {
                    info!(client = %client, reason = %report.reason, "client reported a failed fit task");
                    self.end_slot(shared, &client, ParticipantOutcome::Failed(report.reason.clone()));
                }
                let _ = reply.send(Ok(()));
            }
            other => shared.handle_common((other, span)).await,
        }
    }
}

impl Phase for Training {
    const NAME: PhaseName = PhaseName::Training;

    async fn run(mut self, shared: &mut Shared) -> Round {
        shared.enter(PhaseName::Training, Some(self.deadline));
        let len = shared.model.layout.trainable.numel();
        self.sum = Some(FixedPointSum::new(len));
        let mut tick = shared.tick_interval();
        #[cfg(feature = "test-support")]
        self.test_pause().await;
        while !self.done() {
            let folding = async {
                match self.folding.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            };
            let secure_folding = async {
                match self.secure_folding.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            };
            let step_deadline = self.secure.as_ref().and_then(SecureRound::step_deadline);
            let deadline = self.deadline;
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => {
                    self.abandon();
                    return Round::Shutdown(Shutdown::requested());
                }
                res = folding => self.fold_done(shared, res),
                res = secure_folding => self.secure_fold_done(shared, res),
                _ = tokio::time::sleep_until(step_deadline.unwrap_or(deadline)), if step_deadline.is_some() => {
                    self.close_secure_step(shared)
                }
                _ = tokio::time::sleep_until(deadline), if !self.deadline_passed => self.on_deadline(shared),
                env = shared.requests.recv() => match env {
                    Some(env) => self.on_request(shared, env).await,
                    None => {
                        self.abandon();
                        return Round::Shutdown(Shutdown::requested());
                    }
                },
                _ = tick.tick() => self.check_liveness(shared),
            }
            // A step also closes early when the last client it waited for left the round.
            self.maybe_close_secure_step(shared);
            #[cfg(feature = "test-support")]
            self.test_pause().await;
        }
        if self.secure.is_some() && self.poisoned.is_none() {
            // Survivors keep their task through unmasking: their agents stop a task the
            // coordinator no longer lists (heartbeats), and they still have to answer.
            let survivors: Vec<&ClientId> = self.accepted.iter().map(|a| &a.client).collect();
            let before = shared.tasks.len();
            shared.tasks.retain(|c, _| survivors.contains(&c));
            if shared.tasks.len() != before {
                shared.events.tasks_changed();
            }
        } else {
            shared.withdraw_tasks(TaskKind::Fit);
        }
        let reason = if self.deadline_passed {
            format!("its deadline passed ({:?} after sampling)", shared.settings.rounds.deadline)
        } else {
            "every selected client has reported".to_string()
        };
        shared.closed = Some(Closed { id: self.id, reason });
        let outcomes = self.outcomes();
        let failures: Vec<FitFailure> = outcomes
            .iter()
            .filter(|o| !o.outcome.is_accepted())
            .map(|o| FitFailure { client: o.client.clone(), outcome: o.outcome.clone() })
            .collect();
        let accepted = self.accepted.len();
        let min_fit = crate::sampling::min_accepted(&shared.settings);
        info!(accepted, failed = failures.len(), "training closed");
        if let Some(reason) = self.poisoned {
            return Round::Failure(Failure::new(self.id, reason, outcomes, accepted as u32));
        }
        if accepted < min_fit {
            let reason = AttemptFailure::TooFewAccepted { accepted, min_fit };
            return Round::Failure(Failure::new(self.id, reason, outcomes, accepted as u32));
        }
        if let Some(secure) = self.secure.take() {
            return match secure.close_masking() {
                // The unmasking request is released here: the ledger hook for distributed noise.
                Ok((parts, request)) => Round::Unmasking(Unmasking::new(
                    shared,
                    self.context,
                    parts,
                    request,
                    self.accepted,
                    failures,
                    outcomes,
                )),
                Err(e) => {
                    let reason = AttemptFailure::SecureAggregation(e.to_string());
                    Round::Failure(Failure::new(self.id, reason, outcomes, accepted as u32))
                }
            };
        }
        let sum = self.sum.take().expect("no fold is running once training is done");
        Round::Aggregating(Aggregating::new(self.context, sum, self.accepted, failures, outcomes))
    }
}

impl Training {
    /// Stops here for good if the configured test pause is this secure step of this round.
    #[cfg(feature = "test-support")]
    async fn test_pause(&self) {
        use crate::round::test_pause::{at, PausePoint};
        let Some(secure) = &self.secure else { return };
        let point = match secure.step() {
            SecureStep::Advertising { .. } => PausePoint::Advertising,
            SecureStep::Sharing { .. } => PausePoint::Sharing,
            SecureStep::Masking if !self.accepted.is_empty() => PausePoint::Masking,
            SecureStep::Masking => return,
        };
        at(point, self.id.round).await;
    }

    /// Shutdown mid-round: refuse queued folds (their clients get UNAVAILABLE).
    fn abandon(&mut self) {
        for p in self.queue.drain(..) {
            let _ = p.reply.send(Err(RoundError::ShuttingDown));
        }
    }

    fn outcomes(&self) -> Vec<ClientOutcome> {
        self.slots
            .iter()
            .map(|(c, s)| {
                let accepted = self.accepted.iter().find(|a| &a.client == c);
                ClientOutcome {
                    client: c.clone(),
                    outcome: s.outcome(),
                    num_examples: accepted.map(|a| a.num_examples),
                    metrics: accepted
                        .map(|a| serde_json::json!(a.metrics))
                        .unwrap_or(serde_json::Value::Null),
                }
            })
            .collect()
    }
}
