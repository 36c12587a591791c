//! Who masks with whom: the neighbour graph of a round (Bell et al., CCS 2020).
//!
//! Plain SecAgg (Bonawitz et al., CCS 2017) pairs every client with every other: each client
//! expands n − 1 pairwise masks over the whole model and sends n − 1 share bundles. SecAgg+
//! replaces the complete graph by a sparse random one of degree k = O(log n): masks still cancel
//! (they are pairwise, whatever the graph), and privacy holds as long as the coordinator cannot
//! cut an honest client's neighbourhood down to colluders, which a random graph it did not choose
//! makes unlikely.
//!
//! # Construction
//! For `degree ≥ n − 1` the graph is complete. Otherwise it is the Harary graph H(k, n) on a
//! random permutation of the slots, as Bell et al. use: the slots are shuffled, placed on a
//! ring, and each is joined to the k/2 nearest on either side, so every client has exactly k
//! neighbours (k is rounded up to even). The shuffle is a Fisher–Yates shuffle driven by
//! ChaCha20 keyed with the round's public graph seed, with the uniform draws defined here
//! (rejection sampling of `u64`s), so the coordinator and every client compute the same graph
//! from `(seed, sorted roster)` whatever `rand` version they link.
//!
//! # Choosing k
//! [`suggested_degree`] returns n − 1 (the complete graph) up to [`COMPLETE_GRAPH_MAX_CLIENTS`]
//! clients, where the complete graph's cost is still small, and otherwise the smallest even
//! number ≥ max(20, 3·⌈log₂ n⌉). This is an engineering default in the O(log n) regime the paper
//! proves sufficient, not the paper's own bound: the constant needed depends on the fraction of
//! colluding and dropping clients the operator expects (Bell et al. §4, Table 2); raise k when
//! either is large. Each extra neighbour costs every client one more mask expansion over the
//! whole vector and one more share bundle.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::{SecAggError, Slot};

/// Up to this many clients, [`suggested_degree`] picks the complete graph.
pub const COMPLETE_GRAPH_MAX_CLIENTS: usize = 20;

/// The default degree for a round of `n` clients (see the module docs for why).
pub fn suggested_degree(n: usize) -> usize {
    if n <= COMPLETE_GRAPH_MAX_CLIENTS {
        return n.saturating_sub(1);
    }
    let log2 = usize::BITS - (n - 1).leading_zeros(); // ⌈log₂ n⌉ for n ≥ 2
    let k = (3 * log2 as usize).max(20);
    (k + k % 2).min(n - 1)
}

/// A symmetric graph on the slots `0..n` of a round, without self-loops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourGraph {
    /// Sorted neighbour lists, one per slot.
    neighbours: Vec<Vec<Slot>>,
    complete: bool,
}

impl NeighbourGraph {
    /// The graph for `n` clients of the given degree: complete when `degree ≥ n − 1`, else a
    /// randomly permuted Harary graph from `seed` (see the module docs). Needs n ≥ 2, degree ≥ 1.
    pub fn new(n: usize, degree: usize, seed: &[u8; 32]) -> Result<Self, SecAggError> {
        if n < 2 {
            return Err(SecAggError::InvalidParameters(format!(
                "a round needs at least 2 clients to hide any of them, got {n}"
            )));
        }
        if u32::try_from(n).is_err() {
            return Err(SecAggError::InvalidParameters(format!("{n} clients do not fit in a u32 slot")));
        }
        if degree == 0 {
            return Err(SecAggError::InvalidParameters("the graph degree must be at least 1".into()));
        }
        if degree >= n - 1 {
            let neighbours =
                (0..n).map(|u| (0..n).filter(|&v| v != u).map(|v| Slot(v as u32)).collect()).collect();
            return Ok(NeighbourGraph { neighbours, complete: true });
        }
        let half = degree.div_ceil(2);
        if 2 * half >= n - 1 {
            return NeighbourGraph::new(n, n - 1, seed);
        }
        let order = shuffled_slots(n, seed);
        let mut neighbours: Vec<Vec<Slot>> = vec![Vec::with_capacity(2 * half); n];
        for (pos, &u) in order.iter().enumerate() {
            for step in 1..=half {
                let v = order[(pos + step) % n];
                neighbours[u as usize].push(Slot(v));
                neighbours[v as usize].push(Slot(u));
            }
        }
        for list in &mut neighbours {
            list.sort_unstable();
        }
        Ok(NeighbourGraph { neighbours, complete: false })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.neighbours.len()
    }

    /// Always false: a graph has at least two slots.
    pub fn is_empty(&self) -> bool {
        self.neighbours.is_empty()
    }

    /// Whether every client is every other's neighbour.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The neighbours of `slot`, ascending; empty for a slot outside the graph.
    pub fn neighbours(&self, slot: Slot) -> &[Slot] {
        self.neighbours.get(slot.index()).map_or(&[], Vec::as_slice)
    }

    /// Whether `a` and `b` are distinct neighbours.
    pub fn are_neighbours(&self, a: Slot, b: Slot) -> bool {
        self.neighbours(a).binary_search(&b).is_ok()
    }

    /// Every slot's number of neighbours (the same for all: the graph is regular).
    pub fn degree(&self) -> usize {
        self.neighbours.first().map_or(0, Vec::len)
    }
}

/// Fisher–Yates over `0..n` with draws from ChaCha20 keyed by `seed`.
fn shuffled_slots(n: usize, seed: &[u8; 32]) -> Vec<u32> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// A uniform integer in `0..bound` by rejection, so no value is favoured.
fn uniform_below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let zone = u64::MAX - u64::MAX % bound;
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % bound;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(list: &[u32]) -> Vec<Slot> {
        list.iter().map(|&s| Slot(s)).collect()
    }

    #[test]
    fn small_rounds_get_the_complete_graph() {
        let g = NeighbourGraph::new(5, suggested_degree(5), &[1; 32]).unwrap();
        assert!(g.is_complete());
        assert_eq!(g.neighbours(Slot(2)), slots(&[0, 1, 3, 4]));
        assert_eq!(suggested_degree(COMPLETE_GRAPH_MAX_CLIENTS), COMPLETE_GRAPH_MAX_CLIENTS - 1);
    }

    #[test]
    fn sparse_graphs_are_symmetric_regular_and_loop_free() {
        for (n, k) in [(22, 20), (50, 20), (100, 22), (1000, 30), (37, 7)] {
            let g = NeighbourGraph::new(n, k, &[n as u8; 32]).unwrap();
            assert!(!g.is_complete());
            let even_k = k + k % 2;
            for u in 0..n as u32 {
                let list = g.neighbours(Slot(u));
                assert_eq!(list.len(), even_k, "n={n} k={k} slot {u}");
                assert!(!list.contains(&Slot(u)));
                assert!(list.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
                for &v in list {
                    assert!(g.are_neighbours(v, Slot(u)), "symmetric");
                }
            }
        }
    }

    #[test]
    fn the_graph_is_a_function_of_seed_and_size_only() {
        let a = NeighbourGraph::new(60, 10, &[7; 32]).unwrap();
        assert_eq!(a, NeighbourGraph::new(60, 10, &[7; 32]).unwrap());
        assert_ne!(a, NeighbourGraph::new(60, 10, &[8; 32]).unwrap());
        // Pinned: a change here means coordinator and clients of different versions would
        // disagree on who masks with whom.
        assert_eq!(a.neighbours(Slot(0)), slots(&PINNED_SLOT0_NEIGHBOURS));
    }

    const PINNED_SLOT0_NEIGHBOURS: [u32; 10] = [9, 12, 15, 17, 20, 21, 34, 35, 44, 48];

    #[test]
    fn suggested_degree_grows_logarithmically_and_stays_even() {
        assert_eq!(suggested_degree(2), 1);
        assert_eq!(suggested_degree(50), 20);
        assert_eq!(suggested_degree(100), 22);
        assert_eq!(suggested_degree(1_000_000), 60);
        for n in [21, 33, 100, 5000] {
            assert_eq!(suggested_degree(n) % 2, 0);
        }
    }

    #[test]
    fn degenerate_rounds_are_refused() {
        assert!(matches!(NeighbourGraph::new(1, 1, &[0; 32]), Err(SecAggError::InvalidParameters(_))));
        assert!(matches!(NeighbourGraph::new(4, 0, &[0; 32]), Err(SecAggError::InvalidParameters(_))));
    }
}
