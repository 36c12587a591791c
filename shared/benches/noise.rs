//! Throughput of the exact discrete Gaussian samplers against a naive float Gaussian on the same
//! ChaCha20 generator, and of `add_noise` on a BERT-base-sized update (22.7M values).
//!
//! `cargo bench -p fedtune-shared --bench noise` prints one line per measurement.

use dashu::rational::RBig;
use fedtune_shared::privacy::{
    add_noise, default_grid_log2, fill_noise, for_each_chunk, CksDiscreteGaussian, FastDiscreteGaussian,
    NoisePlacement, NoisePlan, NoiseSampler, NoiseSource,
};
use tokio::time::Instant;

/// Naive continuous Gaussian by Box–Muller on the same generator: the speed reference only.
#[derive(Debug)]
struct BoxMuller(f64);

impl BoxMuller {
    fn fill(&self, rng: &mut fedtune_shared::privacy::NoiseRng, out: &mut [f64]) {
        let unit = |x: u64| ((x >> 11) as f64 + 0.5) * 2f64.powi(-53);
        for pair in out.chunks_mut(2) {
            let (u1, u2) = (unit(rng.next_u64()), unit(rng.next_u64()));
            let r = (-2.0 * u1.ln()).sqrt() * self.0;
            let t = 2.0 * std::f64::consts::PI * u2;
            pair[0] = r * t.cos();
            if let Some(second) = pair.get_mut(1) {
                *second = r * t.sin();
            }
        }
    }
}

fn rate(n: usize, start: Instant) -> f64 {
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("cores available: {cores}");
    let n = 20_000_000;
    let mut ints = vec![0i64; n];
    let mut floats = vec![0f64; n];

    for sigma in [3.0, 1.0e4, 8.4e6] {
        let sampler = FastDiscreteGaussian::new(sigma).expect("sigma in range");
        let one = NoiseSource::seeded_for_tests(1).with_threads(1);
        let all = NoiseSource::seeded_for_tests(2).with_threads(cores);
        let t = Instant::now();
        fill_noise(&sampler, &one, &mut ints);
        let exact_1 = rate(n, t);
        let t = Instant::now();
        fill_noise(&sampler, &all, &mut ints);
        let exact_all = rate(n, t);
        let naive = BoxMuller(sigma);
        let t = Instant::now();
        for_each_chunk(&one, &mut floats, |rng, chunk| naive.fill(rng, chunk));
        let float_1 = rate(n, t);
        let t = Instant::now();
        for_each_chunk(&all, &mut floats, |rng, chunk| naive.fill(rng, chunk));
        let float_all = rate(n, t);
        println!(
            "sigma {sigma:>9.1} grid steps: exact {exact_1:.3e}/s on 1 core, {exact_all:.3e}/s on {cores} \
             ({:.2}x); float Box-Muller {float_1:.3e}/s on 1, {float_all:.3e}/s on {cores}; \
             exact/float {:.2} (1 core)",
            exact_all / exact_1,
            exact_1 / float_1
        );
    }

    let reference_n = 200_000;
    let cks = CksDiscreteGaussian::new(1.0e4).expect("sigma in range");
    let mut few = vec![0i64; reference_n];
    let t = Instant::now();
    fill_noise(&cks, &NoiseSource::seeded_for_tests(3).with_threads(1), &mut few);
    println!(
        "sigma 1e4: CKS reference (exact, same Bernoulli core) {:.3e}/s on 1 core",
        rate(reference_n, t)
    );
    let opendp_n = 50_000;
    let scale = RBig::try_from(1.0e4).expect("finite");
    let t = Instant::now();
    for _ in 0..opendp_n {
        let _ = opendp::traits::samplers::sample_discrete_gaussian(scale.clone()).expect("entropy");
    }
    println!("sigma 1e4: OpenDP 0.16 sample_discrete_gaussian {:.3e}/s on 1 core", rate(opendp_n, t));

    // A BERT-base update: 22.7M values, clip 1, z = 1, default grid.
    let dim = 22_700_000;
    let mut update: Vec<f32> = (0..dim).map(|i| ((i % 1000) as f32 - 500.0) * 1e-7).collect();
    let plan = NoisePlan::new(NoisePlacement::Central, 1.0, 1.0, dim, 100.0).expect("valid plan");
    assert_eq!(plan.grid_log2, default_grid_log2(1.0, dim).expect("valid"));
    for threads in [1, cores] {
        let source = NoiseSource::from_os_entropy().expect("OS entropy").with_threads(threads);
        let t = Instant::now();
        let report = add_noise(&mut update, plan.party_sigma(), plan.grid_log2, &source).expect("fits grid");
        println!(
            "add_noise on {dim} values (grid 2^{}, sigma {:.3e} steps) with {threads} thread(s): {:.3} s",
            report.grid_log2,
            report.sigma_grid,
            t.elapsed().as_secs_f64()
        );
    }
    std::hint::black_box((&ints, &floats, &few, &update, cks.sigma()));
}
