//! Costs of a whole secure-aggregation round (issue 11): per client, advertising keys, agreeing
//! and sharing, and masking; for the coordinator, folding each masked input and unmasking with
//! 0 %, 10 % and 30 % of the sharers dropping; and the bytes each client sends and receives
//! against a plain `f32` upload.
//!
//! ```text
//! cargo bench -p fedtune-shared --bench secagg -- [--d COORDS] [--n 10,50,100] [--dropouts 0,10,30]
//!                                                 [--threshold-fraction 0.5]
//! ```
//! Defaults: d = 22 700 000 (BERT-base), n ∈ {10, 50, 100}, dropouts {0, 10, 30} %. Nothing is
//! asserted about speed (timings depend on the machine); a round whose sum is wrong aborts.
//!
//! # What runs
//! Every (n, dropout) pair is one complete round of the real state machines
//! (`secagg::client::{KeysAdvertised, SharesSent, InputMasked}` and `secagg::server::Aggregator`)
//! at the full d, with every small message encoded to protobuf, decoded and converted back as the
//! receiving side would (`convert::secagg`): that is where the byte counts come from. The degree
//! is `graph::suggested_degree(n)`; the threshold t is the smallest integer above
//! `threshold-fraction · (k + 1)`, at least 2 (default: a majority of each client's k + 1
//! holders, so t > (k + 1)/2 as `docs/secure-aggregation.md` asks against an inconsistent-dropout
//! claim without colluders). Dropped clients advertise and share, then never upload nor answer.
//!
//! Which clients drop is a seeded uniform draw. Some draws leave a neighbourhood with fewer than
//! t surviving holders, and then the round must fail; the bench counts such draws among 1 000
//! (the "failing drop sets" column: an estimate of how often a round of these parameters fails
//! at that dropout rate) and runs the first draw that can succeed.
//!
//! # Correctness and memory
//! Every survivor's masked vector is computed for real (the sum could not be unmasked
//! otherwise), folded into the aggregator and dropped before the next client masks: at most one
//! masked vector, one input, the aggregator's sum and the plain reference sum are alive at once,
//! never n masked vectors. The reference sum is the wrapping sum of the survivors' inputs, kept
//! incrementally; the unmasked result must equal it bit for bit.
//!
//! # Run time
//! A round costs about survivors × (k + 1) mask expansions to mask plus survivors + Σ_dropped
//! (surviving neighbours) expansions to unmask; one expansion over 22.7M coordinates is ~60 ms on
//! a 2-core machine, so the default run takes about 10 minutes of CPU (14 minutes of wall time
//! on a loaded 2-core machine). Use `--d` for a quick run and `--n`, `--dropouts` to pick rows.

use std::collections::BTreeSet;
use std::sync::Arc;

use fedtune_shared::convert::ConvertError;
use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::{ClientId, ModelVersion, RoundId, Sha256};
use fedtune_shared::pb;
use fedtune_shared::round::{MaskedUpdateHeader, UpdateHeader};
use fedtune_shared::secagg::graph::suggested_degree;
use fedtune_shared::secagg::masking::{apply_mask, fold_into, MaskSeed, MaskSign};
use fedtune_shared::secagg::{
    Aggregator, KeyAdvertisement, KeysAdvertised, PeerKeys, RoundContext, RoundRef, RoundSetup,
    RoundUnmaskAnswer, RoundUnmaskRequest, SecAggError, ShareDelivery, ShareUpload, Slot,
};
use prost::Message;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::time::Instant;

const USAGE: &str =
    "usage: secagg [--d COORDS] [--n N,N,..] [--dropouts PCT,PCT,..] [--threshold-fraction F]";

/// Random drop sets drawn per row to estimate how often a round fails at that dropout rate.
const DROP_DRAWS: usize = 1000;

#[derive(Debug)]
struct Args {
    coords: usize,
    clients: Vec<usize>,
    dropouts: Vec<u32>,
    threshold_fraction: f64,
}

fn parse_list<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Vec<T>, String> {
    value.split(',').map(|v| v.trim().parse().map_err(|_| format!("{flag}: `{v}` is not a number"))).collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        coords: 22_700_000,
        clients: vec![10, 50, 100],
        dropouts: vec![0, 10, 30],
        threshold_fraction: 0.5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--d" => args.coords = value.replace('_', "").parse().map_err(|_| format!("--d: `{value}`"))?,
            "--n" => args.clients = parse_list(&flag, &value)?,
            "--dropouts" => args.dropouts = parse_list(&flag, &value)?,
            "--threshold-fraction" => {
                args.threshold_fraction =
                    value.parse().map_err(|_| format!("--threshold-fraction: `{value}`"))?
            }
            _ => return Err(format!("unknown argument `{flag}`")),
        }
    }
    if args.coords == 0 || args.clients.iter().any(|&n| n < 2) || args.dropouts.iter().any(|&p| p >= 100) {
        return Err("need d ≥ 1, every n ≥ 2 and every dropout below 100 %".into());
    }
    if !(0.0..1.0).contains(&args.threshold_fraction) {
        return Err("--threshold-fraction must be in [0, 1)".into());
    }
    Ok(args)
}

/// The smallest t above `fraction · (k + 1)`, at least 2 and at most k + 1.
fn threshold(k: usize, fraction: f64) -> usize {
    ((fraction * (k + 1) as f64).floor() as usize + 1).clamp(2, k + 1)
}

/// Whether the protocol can unmask with `dropped` gone: every survivor's secrets and every
/// dropped client's seeds with survivors need t surviving holders (its neighbours, and itself
/// when it survived). Counts only; the round itself is run by the state machines.
fn recoverable(ctx: &RoundContext, dropped: &BTreeSet<Slot>) -> bool {
    ctx.slots().all(|u| {
        let surviving_neighbours = ctx.graph().neighbours(u).iter().filter(|v| !dropped.contains(v)).count();
        let own = usize::from(!dropped.contains(&u));
        surviving_neighbours + own >= ctx.threshold()
    })
}

/// The first of [`DROP_DRAWS`] seeded uniform drop sets the round can survive, and how many of
/// them it could not.
fn draw_dropped(ctx: &RoundContext, percent: u32) -> Result<(BTreeSet<Slot>, usize), String> {
    let n = ctx.len();
    let count = (n * percent as usize + 50) / 100;
    let mut rng = ChaCha20Rng::seed_from_u64(((n as u64) << 8) | u64::from(percent));
    let mut chosen = None;
    let mut failing = 0;
    for _ in 0..DROP_DRAWS {
        let set: BTreeSet<Slot> =
            rand::seq::index::sample(&mut rng, n, count).into_iter().map(|i| Slot(i as u32)).collect();
        if recoverable(ctx, &set) {
            chosen.get_or_insert(set);
        } else {
            failing += 1;
        }
    }
    let chosen = chosen.ok_or(format!(
        "n = {n}, {percent} % dropouts: none of {DROP_DRAWS} drop sets leaves t = {} holders everywhere",
        ctx.threshold()
    ))?;
    Ok((chosen, failing))
}

/// Encodes `msg`, decodes it and converts it back with the round's context, as the receiving
/// side does; returns the result and the encoded size.
fn over_the_wire<M: Message + Default, T>(
    msg: M,
    ctx: &RoundContext,
    from_pb: fn(M, &RoundContext) -> Result<T, ConvertError>,
) -> Result<(T, usize), String> {
    let bytes = msg.encode_to_vec();
    let decoded = M::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    Ok((from_pb(decoded, ctx).map_err(|e| e.to_string())?, bytes.len()))
}

/// The extra bytes a masked upload's header has over a plain one (encoding and context digest).
fn masked_header_extra(ctx: &RoundContext) -> usize {
    let header = UpdateHeader {
        id: RoundId::new(ctx.round(), ctx.attempt()),
        base_version: ModelVersion(1),
        num_examples: 100,
        metrics: Default::default(),
        manifest_digest: Sha256([1; 32]),
        total_bytes: 4 * ctx.vector_len() as u64,
        encoding: Default::default(),
    };
    let plain = pb::UpdateHeader::from(&header).encoded_len();
    let masked = pb::UpdateHeader::from(&MaskedUpdateHeader { header, secagg_context: *ctx.digest() });
    masked.encoded_len() - plain
}

/// A deterministic input for client `slot`, different per client and spread over the ring.
fn fill_input(slot: Slot, input: &mut [u32]) {
    let salt = slot.0.wrapping_mul(0x9E37_79B9) ^ 0x5bd1_e995;
    for (j, x) in input.iter_mut().enumerate() {
        *x = (j as u32 ^ salt).wrapping_mul(0x85EB_CA6B).rotate_left(slot.0 % 32);
    }
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Median and maximum.
fn spread(values: &[f64]) -> (f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v.get(v.len() / 2).copied().unwrap_or(0.0), v.last().copied().unwrap_or(0.0))
}

/// Bytes one client sends and receives in a round (encoded protobuf), besides the masked vector.
#[derive(Debug, Default, Clone, Copy)]
struct ClientBytes {
    setup: usize,
    keys: usize,
    peer_keys: usize,
    shares: usize,
    delivered: usize,
    request: usize,
    answer: usize,
    header_extra: usize,
}

impl ClientBytes {
    fn total(&self) -> usize {
        self.setup
            + self.keys
            + self.peer_keys
            + self.shares
            + self.delivered
            + self.request
            + self.answer
            + self.header_extra
    }
}

/// What one round measured.
#[derive(Debug)]
struct RoundFigures {
    n: usize,
    k: usize,
    t: usize,
    percent: u32,
    dropped: usize,
    failing_draws: usize,
    advertise_ms: Vec<f64>,
    share_ms: Vec<f64>,
    mask_ms: Vec<f64>,
    answer_ms: Vec<f64>,
    /// The survivor with the most secure-aggregation bytes.
    largest: ClientBytes,
    check_keys_ms: f64,
    check_shares_ms: f64,
    fold_ms: Vec<f64>,
    answers_ms: f64,
    finish_ms: f64,
    finish_expansions: usize,
}

fn run_round(
    n: usize,
    percent: u32,
    ids: &[KeyPair],
    coords: usize,
    fraction: f64,
) -> Result<RoundFigures, String> {
    let k = suggested_degree(n);
    let members = ids
        .iter()
        .enumerate()
        .map(|(i, key)| (ClientId::parse(&format!("site-{i:04}")).unwrap(), key.public_key()))
        .collect();
    let ctx = Arc::new(
        RoundContext::new(RoundSetup {
            federation_id: "bench".into(),
            round: 1,
            attempt: 0,
            members,
            threshold: threshold(k, fraction),
            degree: k,
            graph_seed: [1; 32],
            vector_len: coords,
        })
        .map_err(|e| e.to_string())?,
    );
    let (dropped, failing_draws) = draw_dropped(&ctx, percent)?;
    let here = RoundRef::of(&ctx);
    let setup_bytes = pb::SecAggSetup::from(ctx.as_ref()).encoded_len();
    let mut bytes =
        vec![
            ClientBytes { setup: setup_bytes, header_extra: masked_header_extra(&ctx), ..Default::default() };
            n
        ];
    let mut agg = Aggregator::new(ctx.clone());
    let err = |e: SecAggError| e.to_string();

    // Step 1: advertise.
    let (mut advertise_ms, mut check_keys_ms, mut advertised) = (Vec::new(), 0.0, Vec::new());
    for (i, id) in ids.iter().enumerate() {
        let me = Slot(i as u32);
        let start = Instant::now();
        let (state, keys) = KeysAdvertised::start(ctx.clone(), me, id).map_err(err)?;
        advertise_ms.push(ms(start));
        let sent = KeyAdvertisement { round: here, keys };
        let (got, len) = over_the_wire((&sent).into(), &ctx, KeyAdvertisement::from_pb)?;
        bytes[i].keys = len;
        let start = Instant::now();
        agg.accept_keys(me, got.keys).map_err(err)?;
        check_keys_ms += ms(start);
        advertised.push(state);
    }
    agg.close_advertising().map_err(err)?;

    // Step 2: agree and share.
    let (mut share_ms, mut check_shares_ms, mut shared) = (Vec::new(), 0.0, Vec::new());
    for (i, state) in advertised.into_iter().enumerate() {
        let me = Slot(i as u32);
        let (got, len) = over_the_wire(
            (&PeerKeys { round: here, keys: agg.keys_for(me) }).into(),
            &ctx,
            PeerKeys::from_pb,
        )?;
        bytes[i].peer_keys = len;
        let start = Instant::now();
        let (next, bundles) = state.share(&got.keys).map_err(err)?;
        share_ms.push(ms(start));
        let (upload, len) =
            over_the_wire((&ShareUpload { round: here, bundles }).into(), &ctx, ShareUpload::from_pb)?;
        bytes[i].shares = len;
        let start = Instant::now();
        agg.accept_shares(me, upload.bundles).map_err(err)?;
        check_shares_ms += ms(start);
        shared.push(next);
    }
    let sharers = agg.close_sharing().map_err(err)?;

    // Step 3: survivors mask and upload; the dropped never do. One masked vector at a time.
    let (mut mask_ms, mut fold_ms, mut masked) = (Vec::new(), Vec::new(), Vec::new());
    let mut input = vec![0u32; coords];
    let mut expected = vec![0u32; coords];
    for (i, state) in shared.into_iter().enumerate() {
        let me = Slot(i as u32);
        if dropped.contains(&me) {
            continue;
        }
        let delivery = ShareDelivery { round: here, bundles: agg.shares_for(me), sharers: sharers.clone() };
        let (got, len) = over_the_wire((&delivery).into(), &ctx, ShareDelivery::from_pb)?;
        bytes[i].delivered = len;
        fill_input(me, &mut input);
        let start = Instant::now();
        let (next, upload) = state.mask(&got.bundles, &got.sharers, &input).map_err(err)?;
        mask_ms.push(ms(start));
        expected.iter_mut().zip(&input).for_each(|(e, x)| *e = e.wrapping_add(*x));
        let start = Instant::now();
        agg.accept_masked_input(upload).map_err(err)?;
        fold_ms.push(ms(start));
        masked.push((i, next));
    }
    drop(input);

    // Step 4: unmask.
    let request = RoundUnmaskRequest { round: here, request: agg.close_masking().map_err(err)? };
    let (request, request_len) = over_the_wire((&request).into(), &ctx, RoundUnmaskRequest::from_pb)?;
    let (mut answer_ms, mut answers_ms) = (Vec::new(), 0.0);
    for (i, state) in masked {
        bytes[i].request = request_len;
        let start = Instant::now();
        let answer = state.unmask(&request.request).map_err(err)?;
        answer_ms.push(ms(start));
        let (got, len) = over_the_wire(
            (&RoundUnmaskAnswer { round: here, answer }).into(),
            &ctx,
            RoundUnmaskAnswer::from_pb,
        )?;
        bytes[i].answer = len;
        let start = Instant::now();
        agg.accept_unmask_answer(got.answer).map_err(err)?;
        answers_ms += ms(start);
    }
    let start = Instant::now();
    let sum = agg.finish().map_err(err)?;
    let finish_ms = ms(start);
    if sum != expected {
        let first = sum.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "n = {n}, {percent} % dropouts: the unmasked sum differs from the survivors' plain sum \
             (first at coordinate {first})"
        ));
    }

    let survivors = |v: &Slot| !dropped.contains(v);
    let pair_removals: usize =
        dropped.iter().map(|&v| ctx.graph().neighbours(v).iter().filter(|w| survivors(w)).count()).sum();
    let largest = ctx
        .slots()
        .filter(|u| survivors(u))
        .map(|u| bytes[u.index()])
        .max_by_key(ClientBytes::total)
        .unwrap_or_default();
    Ok(RoundFigures {
        n,
        k: ctx.graph().degree(),
        t: ctx.threshold(),
        percent,
        dropped: dropped.len(),
        failing_draws,
        advertise_ms,
        share_ms,
        mask_ms,
        answer_ms,
        largest,
        check_keys_ms,
        check_shares_ms,
        fold_ms,
        answers_ms,
        finish_ms,
        finish_expansions: n - dropped.len() + pair_removals,
    })
}

fn print_client_row(f: &RoundFigures, coords: usize) {
    let pair = |v: &[f64], digits: usize| {
        let (med, max) = spread(v);
        format!("{med:.digits$} / {max:.digits$}")
    };
    let b = &f.largest;
    let plain = 4 * coords;
    println!(
        "{:>4} {:>4}% {:>3} {:>3} | {:>13} | {:>13} | {:>17} | {:>11} | {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>7} {:>5} | {:>8} | {:.5}",
        f.n,
        f.percent,
        f.k,
        f.t,
        pair(&f.advertise_ms, 2),
        pair(&f.share_ms, 2),
        pair(&f.mask_ms, 0),
        pair(&f.answer_ms, 2),
        b.keys,
        b.shares,
        b.answer,
        b.header_extra,
        b.setup,
        b.peer_keys,
        b.delivered,
        b.request,
        b.total(),
        (plain + b.total()) as f64 / plain as f64,
    );
}

fn print_coordinator_row(f: &RoundFigures) {
    let (fold_med, fold_max) = spread(&f.fold_ms);
    println!(
        "{:>4} {:>4}% {:>7} | {:>10.1} | {:>12.1} | {:>6.1} / {:>6.1} | {:>10.1} | {:>9.0} | {:>10} | {:>4}/{DROP_DRAWS}",
        f.n,
        f.percent,
        f.dropped,
        f.check_keys_ms,
        f.check_shares_ms,
        fold_med,
        fold_max,
        f.answers_ms,
        f.finish_ms,
        f.finish_expansions,
        f.failing_draws,
    );
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let coords = args.coords;
    println!(
        "secure aggregation round costs: d = {coords} coordinates (plain f32 upload {:.2} MB), \
         t = smallest integer > {:.2}·(k + 1), at least 2",
        (4 * coords) as f64 / 1e6,
        args.threshold_fraction
    );

    // Reference rates, for reading the round figures on a noisy machine.
    let mut values = vec![0u32; coords];
    let seed = MaskSeed::from_bytes([7; 32]);
    apply_mask(&mut values, &seed, MaskSign::Add); // warm the pages
    let start = Instant::now();
    apply_mask(&mut values, &seed, MaskSign::Add);
    let expansion = ms(start);
    let other = values.clone();
    let start = Instant::now();
    fold_into(&mut values, &other);
    println!(
        "reference: one mask expansion + add over d {expansion:.1} ms ({:.2} GB/s of keystream), \
         one fold {:.1} ms\n",
        (coords * 4) as f64 / expansion / 1e6,
        ms(start)
    );
    drop((values, other));

    let mut rounds = Vec::new();
    for &n in &args.clients {
        let ids: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate_ephemeral().unwrap()).collect();
        for &percent in &args.dropouts {
            let start = Instant::now();
            match run_round(n, percent, &ids, coords, args.threshold_fraction) {
                Ok(f) => {
                    eprintln!(
                        "n = {n}, {percent} % dropouts: sum checked, round ran in {:.1} s",
                        ms(start) / 1e3
                    );
                    rounds.push(f);
                }
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
    }

    println!(
        "PER CLIENT (times: median / max over the round's clients, ms; bytes: the survivor with the most)"
    );
    println!("  mask = open the bundles, copy the input, add the self-mask and k pairwise masks over d");
    println!("  sent: keys = key advertisement, shares = sealed bundles, answer = unmask answer, hdr = masked-header extra");
    println!(
        "  recv: setup = round set-up, keys = peer keys, bundles = delivered shares, req = unmask request"
    );
    println!(
        "{:>4} {:>5} {:>3} {:>3} | {:>13} | {:>13} | {:>17} | {:>11} | {:>6} {:>6} {:>6} {:>6} | {:>6} {:>6} {:>7} {:>5} | {:>8} | (4d + secagg)/4d",
        "n", "drop", "k", "t", "advertise", "share", "mask", "answer", "keys", "shares", "answer", "hdr", "setup",
        "keys", "bundles", "req", "secagg B"
    );
    for f in &rounds {
        print_client_row(f, coords);
    }
    println!("\nCOORDINATOR (ms; fold: median / max per masked input; finish = Aggregator::finish, expansions it ran)");
    println!(
        "{:>4} {:>5} {:>7} | {:>10} | {:>12} | {:>15} | {:>10} | {:>9} | {:>10} | failing drop sets",
        "n", "drop", "dropped", "check keys", "check shares", "fold", "answers", "finish", "expansions"
    );
    for f in &rounds {
        print_coordinator_row(f);
    }
}
