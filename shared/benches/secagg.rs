//! Costs of the secure-aggregation core at BERT-base size (22.7M coordinates): mask expansion
//! (each client does one per neighbour plus its self-mask; the coordinator one per survivor plus
//! one per dropped-client/survivor pair), folding a masked vector into the sum, and one client's
//! key-agreement-and-sharing step for a few neighbourhood sizes.
//!
//! `cargo bench -p fedtune-shared --bench secagg` prints one line per measurement; nothing is
//! asserted (timings depend on the machine).

use std::sync::Arc;

use fedtune_shared::crypto::KeyPair;
use fedtune_shared::ids::ClientId;
use fedtune_shared::secagg::graph::suggested_degree;
use fedtune_shared::secagg::masking::{apply_mask, fold_into, MaskSeed, MaskSign};
use fedtune_shared::secagg::{KeysAdvertised, RoundContext, RoundSetup, Slot};
use tokio::time::Instant;

const COORDS: usize = 22_700_000;

fn main() {
    let mut values = vec![0u32; COORDS];
    let seed = MaskSeed::from_bytes([7; 32]);
    apply_mask(&mut values, &seed, MaskSign::Add); // warm the pages
    for _ in 0..3 {
        let t = Instant::now();
        apply_mask(&mut values, &seed, MaskSign::Add);
        let s = t.elapsed().as_secs_f64();
        println!(
            "mask expansion + add, {COORDS} coords: {:.1} ms ({:.2} GB/s of keystream)",
            s * 1e3,
            (COORDS * 4) as f64 / s / 1e9
        );
    }
    let other = values.clone();
    let t = Instant::now();
    fold_into(&mut values, &other);
    println!(
        "fold one masked vector into the sum, {COORDS} coords: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    for n in [10, 50, 100] {
        let k = suggested_degree(n);
        let ids: Vec<KeyPair> = (0..n).map(|_| KeyPair::generate_ephemeral().unwrap()).collect();
        let ctx = Arc::new(
            RoundContext::new(RoundSetup {
                federation_id: "bench".into(),
                round: 1,
                attempt: 0,
                members: ids
                    .iter()
                    .enumerate()
                    .map(|(i, key)| (ClientId::parse(&format!("c{i:03}")).unwrap(), key.public_key()))
                    .collect(),
                threshold: k / 2 + 1,
                degree: k,
                graph_seed: [1; 32],
                vector_len: COORDS,
            })
            .unwrap(),
        );
        let t = Instant::now();
        let (me, my_keys) = KeysAdvertised::start(ctx.clone(), Slot(0), &ids[0]).unwrap();
        let advertise = t.elapsed();
        let peer_keys: Vec<_> = ctx
            .graph()
            .neighbours(Slot(0))
            .iter()
            .map(|&p| KeysAdvertised::start(ctx.clone(), p, &ids[p.index()]).unwrap().1)
            .flat_map(|keys| keys.into_iter().filter(|k| k.peer == Slot(0)))
            .collect();
        let t = Instant::now();
        let (_, bundles) = me.share(&peer_keys).unwrap();
        let share = t.elapsed();
        let bytes: usize = my_keys.len() * 96 + bundles.iter().map(|b| b.ciphertext.len()).sum::<usize>();
        println!(
            "n={n} k={k} t={}: advertise {:.2} ms, agree+share {:.2} ms, key and share bytes sent {bytes} \
             ({:.3}% of a {COORDS}-coordinate upload); masking costs {} expansions",
            k / 2 + 1,
            advertise.as_secs_f64() * 1e3,
            share.as_secs_f64() * 1e3,
            bytes as f64 / (COORDS * 4) as f64 * 100.0,
            k + 1
        );
    }
}
