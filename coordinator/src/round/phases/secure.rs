//! The secure part of a training phase under secure aggregation (SecAgg+, `docs/secure-aggregation.md`):
//! the sub-steps `Advertising → Sharing → Masking` around the protocol core's
//! [`Aggregator`], which the training loop drives. Unmasking is a phase of its own
//! ([`super::unmasking`]).
//!
//! - **Advertising** closes once every selected client still in the round advertised its keys,
//!   or `secure_aggregation.step_timeout` after it opened; then each advertiser's peer keys are
//!   ready for it.
//! - **Sharing** closes the same way over the advertisers; then each sharer's bundles are ready.
//! - **Masking** takes masked uploads (only from sharers); they are folded into the ring sum off
//!   the reactor by the training loop ([`SecureRound::take_aggregator`]).
//!
//! Fewer than t clients at a step's close fail the attempt: the next attempt starts over with a
//! fresh roster and fresh keys. Nothing here is persisted: a restarted coordinator marks an
//! unfinished attempt aborted and never resumes a secure one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::ids::{ClientId, RoundId};
use fedtune_shared::round::SecureRoundFigures;
use fedtune_shared::secagg::{
    Aggregator, AwaitedStep, Encoding, KeyAdvertisement, PeerKeys, RoundContext, RoundRef, SecAggError,
    SecureTask, ShareDelivery, ShareUpload, Slot, StepInput, UnmaskRequest,
};
use tokio::time::Instant;

use crate::error::RoundError;

/// Where a secure round stands inside training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SecureStep {
    /// Collecting agreement keys until `until`.
    Advertising { until: Instant },
    /// Collecting sealed share bundles until `until`.
    Sharing { until: Instant },
    /// Taking masked uploads (until the round's deadline).
    Masking,
}

/// The coordinator's state of one secure attempt while it trains.
#[derive(Debug)]
pub(crate) struct SecureRound {
    task: Arc<SecureTask>,
    ctx: Arc<RoundContext>,
    encoding: Encoding,
    /// `None` while a fold holds it.
    aggregator: Option<Aggregator>,
    step: SecureStep,
    step_timeout: Duration,
    advertised: BTreeSet<Slot>,
    shared: BTreeSet<Slot>,
    /// Ready once advertising closed: each advertiser's keys from its neighbours.
    peer_keys: Option<BTreeMap<Slot, PeerKeys>>,
    /// Ready once sharing closed: each sharer's bundles and the list of sharers.
    deliveries: Option<BTreeMap<Slot, ShareDelivery>>,
}

impl SecureRound {
    /// A secure attempt about to collect agreement keys; advertising stays open `step_timeout`.
    pub(crate) fn new(
        task: Arc<SecureTask>,
        ctx: Arc<RoundContext>,
        encoding: Encoding,
        step_timeout: Duration,
    ) -> Self {
        Self {
            task,
            aggregator: Some(Aggregator::new(ctx.clone())),
            ctx,
            encoding,
            step: SecureStep::Advertising { until: Instant::now() + step_timeout },
            step_timeout,
            advertised: BTreeSet::new(),
            shared: BTreeSet::new(),
            peer_keys: None,
            deliveries: None,
        }
    }

    /// The round's context (roster, threshold, digest).
    pub(crate) fn context(&self) -> &Arc<RoundContext> {
        &self.ctx
    }

    /// What the attempt was set up with, as recorded and reported: n, t and the graph's actual
    /// degree k.
    pub(crate) fn figures(&self) -> SecureRoundFigures {
        SecureRoundFigures {
            clients: self.ctx.len() as u32,
            threshold: self.ctx.threshold() as u32,
            degree: self.ctx.graph().degree() as u32,
        }
    }

    /// The fit tasks' secure part.
    pub(crate) fn task(&self) -> &Arc<SecureTask> {
        &self.task
    }

    /// The current sub-step.
    pub(crate) fn step(&self) -> SecureStep {
        self.step
    }

    /// When the open advertising or sharing step closes at the latest.
    pub(crate) fn step_deadline(&self) -> Option<Instant> {
        match self.step {
            SecureStep::Advertising { until } | SecureStep::Sharing { until } => Some(until),
            SecureStep::Masking => None,
        }
    }

    fn id(&self) -> RoundId {
        RoundId::new(self.ctx.round(), self.ctx.attempt())
    }

    /// The caller's slot; a client outside the roster has no part in this attempt.
    pub(crate) fn slot_of(&self, client: &ClientId) -> Result<Slot, RoundError> {
        self.ctx.slot_of(client).ok_or_else(|| RoundError::AttemptEnded {
            round: self.id(),
            client: client.clone(),
            reason: "the client is not in this secure round's roster".into(),
        })
    }

    /// Refuses a message for another attempt: an earlier attempt of this round or an earlier
    /// round has ended (ABORTED), anything else names a round that is not this one.
    pub(crate) fn check_round(&self, client: &ClientId, round: RoundRef) -> Result<(), RoundError> {
        if round == RoundRef::of(&self.ctx) {
            return Ok(());
        }
        let named = RoundId::new(round.round, round.attempt);
        if named < self.id() {
            return Err(RoundError::AttemptEnded {
                round: named,
                client: client.clone(),
                reason: format!("the coordinator runs {} now", self.id()),
            });
        }
        Err(SecAggError::WrongRound { round: round.round, attempt: round.attempt }.into())
    }

    fn step_closed(&self, what: &str) -> RoundError {
        let now = match self.step {
            SecureStep::Advertising { .. } => "advertising keys",
            SecureStep::Sharing { .. } => "sharing",
            SecureStep::Masking => "masked uploads",
        };
        RoundError::SecureStep {
            round: self.id(),
            reason: format!("{what} is not open (the round is at {now})"),
        }
    }

    fn aggregator(&mut self) -> Result<&mut Aggregator, RoundError> {
        // Only the masking step hands the aggregator to a fold; advertising and sharing never
        // run while it is away.
        self.aggregator.as_mut().ok_or_else(|| RoundError::Internal("the secure sum is being folded".into()))
    }

    /// Step 1: a client's keys. The keys must be the caller's own (its slot); the core checks
    /// signatures, peers and repetition.
    pub(crate) fn advertise(&mut self, client: &ClientId, msg: KeyAdvertisement) -> Result<(), RoundError> {
        self.check_round(client, msg.round)?;
        let me = self.slot_of(client)?;
        if !matches!(self.step, SecureStep::Advertising { .. }) {
            return Err(self.step_closed("advertising keys"));
        }
        if let Some(k) = msg.keys.iter().find(|k| k.owner != me) {
            return Err(SecAggError::UnknownClient {
                what: "agreement key owner (not the caller)",
                slot: k.owner,
            }
            .into());
        }
        self.aggregator()?.accept_keys(me, msg.keys)?;
        self.advertised.insert(me);
        Ok(())
    }

    /// Step 2: a client's sealed bundles, its own.
    pub(crate) fn share(&mut self, client: &ClientId, msg: ShareUpload) -> Result<(), RoundError> {
        self.check_round(client, msg.round)?;
        let me = self.slot_of(client)?;
        if !matches!(self.step, SecureStep::Sharing { .. }) {
            return Err(self.step_closed("sharing"));
        }
        if let Some(b) = msg.bundles.iter().find(|b| b.sender != me) {
            return Err(SecAggError::UnknownClient {
                what: "share bundle sender (not the caller)",
                slot: b.sender,
            }
            .into());
        }
        self.aggregator()?.accept_shares(me, msg.bundles)?;
        self.shared.insert(me);
        Ok(())
    }

    /// True once every client in `active` (still in the round) has done the open step, so it
    /// can close before its timeout.
    pub(crate) fn step_complete<'a>(&self, active: impl IntoIterator<Item = &'a ClientId>) -> bool {
        let mut slots = active.into_iter().filter_map(|c| self.ctx.slot_of(c));
        match self.step {
            SecureStep::Advertising { .. } => slots.all(|s| self.advertised.contains(&s)),
            SecureStep::Sharing { .. } => {
                slots.filter(|s| self.advertised.contains(s)).all(|s| self.shared.contains(&s))
            }
            SecureStep::Masking => false,
        }
    }

    /// The clients that took part in every step closed so far (advertised, then shared); the
    /// others have no part in the rest of the attempt.
    pub(crate) fn still_in(&self, client: &ClientId) -> bool {
        let Some(me) = self.ctx.slot_of(client) else { return false };
        match self.step {
            SecureStep::Advertising { .. } => true,
            SecureStep::Sharing { .. } => self.advertised.contains(&me),
            SecureStep::Masking => self.shared.contains(&me),
        }
    }

    /// Closes the open advertising or sharing step. Below the threshold the attempt fails.
    pub(crate) fn close_step(&mut self) -> Result<(), SecAggError> {
        let round = RoundRef::of(&self.ctx);
        let agg = self.aggregator.as_mut().expect("no fold runs before masking");
        match self.step {
            SecureStep::Advertising { .. } => {
                let advertisers = agg.close_advertising()?;
                let keys =
                    advertisers.iter().map(|&s| (s, PeerKeys { round, keys: agg.keys_for(s) })).collect();
                self.peer_keys = Some(keys);
                self.step = SecureStep::Sharing { until: Instant::now() + self.step_timeout };
            }
            SecureStep::Sharing { .. } => {
                let sharers = agg.close_sharing()?;
                let deliveries = sharers
                    .iter()
                    .map(|&s| {
                        (s, ShareDelivery { round, bundles: agg.shares_for(s), sharers: sharers.clone() })
                    })
                    .collect();
                self.deliveries = Some(deliveries);
                self.step = SecureStep::Masking;
            }
            SecureStep::Masking => {}
        }
        Ok(())
    }

    /// What a waiting client gets now: its step's input, `Pending`, or ABORTED when it has no
    /// part in the step (it missed an earlier step).
    pub(crate) fn step_input(
        &self,
        client: &ClientId,
        round: RoundRef,
        step: AwaitedStep,
    ) -> Result<StepInput, RoundError> {
        self.check_round(client, round)?;
        let me = self.slot_of(client)?;
        let left_out = |what: &str| RoundError::AttemptEnded {
            round: self.id(),
            client: client.clone(),
            reason: format!("the client {what}"),
        };
        match step {
            AwaitedStep::PeerKeys => match &self.peer_keys {
                None => Ok(StepInput::Pending),
                Some(keys) => keys
                    .get(&me)
                    .cloned()
                    .map(StepInput::PeerKeys)
                    .ok_or_else(|| left_out("did not advertise in time")),
            },
            AwaitedStep::Shares => match &self.deliveries {
                None if self.peer_keys.as_ref().is_some_and(|k| !k.contains_key(&me)) => {
                    Err(left_out("did not advertise in time"))
                }
                None => Ok(StepInput::Pending),
                Some(d) => d
                    .get(&me)
                    .cloned()
                    .map(StepInput::Shares)
                    .ok_or_else(|| left_out("did not share in time")),
            },
            AwaitedStep::Unmask => match &self.deliveries {
                Some(d) if !d.contains_key(&me) => Err(left_out("did not share in time")),
                None if self.peer_keys.as_ref().is_some_and(|k| !k.contains_key(&me)) => {
                    Err(left_out("did not advertise in time"))
                }
                _ => Ok(StepInput::Pending),
            },
        }
    }

    /// Checks that `client` may start a masked upload naming `context`: the round is at masking
    /// and the client shared.
    pub(crate) fn check_masked_upload(
        &self,
        client: &ClientId,
        context: &[u8; 32],
    ) -> Result<(), RoundError> {
        if context != self.ctx.digest() {
            return Err(RoundError::SecureStep {
                round: self.id(),
                reason: "header.secagg_context_sha256 names another secure round context".into(),
            });
        }
        let me = self.slot_of(client)?;
        match &self.deliveries {
            None => Err(self.step_closed("a masked upload")),
            Some(d) if !d.contains_key(&me) => Err(RoundError::AttemptEnded {
                round: self.id(),
                client: client.clone(),
                reason: "the client did not share in time, so its masked input cannot be unmasked".into(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Hands the aggregator to a fold (`None` if a fold has it).
    pub(crate) fn take_aggregator(&mut self) -> Option<Aggregator> {
        self.aggregator.take()
    }

    /// Takes the aggregator back from a fold.
    pub(crate) fn put_aggregator(&mut self, agg: Aggregator) {
        self.aggregator = Some(agg);
    }

    /// Ends masking: the unmasking request, with the aggregator that will take the answers.
    /// Below the threshold the attempt fails.
    pub(crate) fn close_masking(mut self) -> Result<(SecureParts, UnmaskRequest), SecAggError> {
        let mut agg = self.aggregator.take().expect("no fold runs once training is done");
        let request = agg.close_masking()?;
        Ok((SecureParts { ctx: self.ctx, encoding: self.encoding, aggregator: agg }, request))
    }
}

/// What unmasking takes over from training.
#[derive(Debug)]
pub(crate) struct SecureParts {
    /// The round's context.
    pub(crate) ctx: Arc<RoundContext>,
    /// The round's encoding.
    pub(crate) encoding: Encoding,
    /// The core's state, at unmasking.
    pub(crate) aggregator: Aggregator,
}
