//! `netem_queue`: netem's delay and loss, done from userspace on the kernel's packet path.
//!
//! The netns fault suite (`tests/tests/netns_faults.rs`) needs `tc qdisc … netem delay 100ms 20ms
//! loss 1%`, but the kernels it runs on (CI's included) are built without `sch_netem`. They do
//! have NFQUEUE: an iptables rule hands every packet of a chain to a netlink queue, the kernel
//! parks it, and only a verdict from the queue's listener lets it go on (accept) or frees it
//! (drop). This listener holds each packet for `delay ± jitter` (uniform), then accepts it, and
//! drops a `loss` fraction of them instead. Verdicts go out in release order, not arrival order,
//! so jittered packets are reordered exactly as netem's time-sorted queue reorders them; a drop
//! is silent to the sender, like a loss on the wire.
//!
//! Run it inside the namespace whose traffic it shapes (netlink queues are per namespace):
//!
//! ```text
//! ip netns exec NS netem_queue --queue 7 --delay-ms 100 --jitter-ms 20 --loss 0.01 &
//! ip netns exec NS iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 7
//! ```
//!
//! It prints `bound to queue N` on stdout once it listens (add the iptables rule only after
//! that: a packet queued to nobody is dropped) and runs until killed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nfq::{Queue, Verdict};
use rand::{Rng, SeedableRng};
// Tokio's clock (the workspace's one clock), read without a runtime: this loop is synchronous.
use tokio::time::Instant;

/// The shaping asked for on the command line.
#[derive(Debug)]
struct Shape {
    queue: u16,
    delay: Duration,
    jitter: Duration,
    loss: f64,
    seed: u64,
}

fn parse_args() -> Result<Shape> {
    let mut shape = Shape { queue: 0, delay: Duration::ZERO, jitter: Duration::ZERO, loss: 0.0, seed: 1 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let ms = || value.parse::<u64>().map(Duration::from_millis);
        match flag.as_str() {
            "--queue" => shape.queue = value.parse()?,
            "--delay-ms" => shape.delay = ms()?,
            "--jitter-ms" => shape.jitter = ms()?,
            "--loss" => shape.loss = value.parse()?,
            "--seed" => shape.seed = value.parse()?,
            other => bail!(
                "unknown flag {other}; usage: netem_queue --queue N [--delay-ms MS] [--jitter-ms MS] \
                 [--loss FRACTION] [--seed S]"
            ),
        }
    }
    if !(0.0..1.0).contains(&shape.loss) {
        bail!("--loss must be in [0, 1), got {}", shape.loss);
    }
    if shape.jitter > shape.delay {
        bail!("--jitter-ms must not exceed --delay-ms (a packet cannot leave before it arrived)");
    }
    Ok(shape)
}

/// A held packet, ordered by when it is due (then by arrival, so equal times keep their order).
struct Held {
    due: Instant,
    seq: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

fn main() -> Result<()> {
    let shape = parse_args()?;
    let mut queue = Queue::open().context("opening a netfilter queue socket (root? NETLINK_QUEUE?)")?;
    queue.bind(shape.queue).with_context(|| format!("binding NFQUEUE {}", shape.queue))?;
    // Room for every packet in flight over 120 ms of a busy link, far above what a test sends.
    queue.set_queue_max_len(shape.queue, 8192)?;
    queue.set_nonblocking(true);
    println!("bound to queue {}", shape.queue);
    std::io::stdout().flush()?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(shape.seed);
    let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        // Take everything the kernel has queued.
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    if rng.random_bool(shape.loss) {
                        msg.set_verdict(Verdict::Drop);
                        queue.verdict(msg)?;
                        continue;
                    }
                    let spread = shape.jitter.as_secs_f64();
                    let delay = shape.delay.as_secs_f64() + rng.random_range(-spread..=spread);
                    msg.set_verdict(Verdict::Accept);
                    held.push(Reverse(Held {
                        due: Instant::now() + Duration::from_secs_f64(delay),
                        seq,
                        msg,
                    }));
                    seq += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the netfilter queue"),
            }
        }
        // Release what is due.
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse(h)| h.due <= now) {
            let Reverse(h) = held.pop().expect("peeked");
            queue.verdict(h.msg)?;
        }
        // The socket is non-blocking (verdicts and reads share it), so poll it at 1 ms: the
        // delay's resolution, well inside the ± 20 ms the suite asks for.
        let until_due = held.peek().map_or(Duration::from_millis(1), |Reverse(h)| h.due - now);
        std::thread::sleep(until_due.min(Duration::from_millis(1)));
    }
}
