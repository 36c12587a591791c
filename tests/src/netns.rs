//! Hosts as Linux network namespaces: a [`Lab`] is one switch namespace holding a bridge, and one
//! namespace per host wired to it by a veth pair, so each host has its own stack, its own
//! `eth0` and its own netfilter tables. Faults are real link events: a host's switch port set
//! down ([`Lab::cut`]), every process of a host `kill -9`ed ([`Lab::kill_host`]), delay and loss
//! on its link ([`Lab::shape`]).
//!
//! The test process itself stays in the root namespace and reaches the hosts through an uplink
//! (one more veth pair from the root namespace into the switch), to read the coordinator's
//! status the way an operator's machine would. The bridge lives in its own namespace, not the
//! root one, so a host firewall (a `FORWARD DROP` policy with `br_netfilter`, as Docker sets up)
//! never sees the lab's traffic.
//!
//! Names carry the test process id (`ftn<pid>n<k>-<host>` namespaces, `ftn<pid>u<k>` uplink):
//! a lab removes everything it made when dropped (a failed assertion or a panic included), and
//! [`Lab::new`] first removes what labs of processes that no longer run left behind (a
//! `kill -9`ed test run cannot drop anything).
//!
//! Needs root and `ip` (iproute2); [`Lab::shape`] needs `iptables` and a kernel with NFQUEUE.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::process::Proc;

/// What labs' names start with.
const PREFIX: &str = "ftn";

/// Delay and loss on a host's link, as `tc qdisc … netem delay DELAY JITTER loss LOSS` would
/// set them on the host's `eth0`.
#[derive(Debug, Clone, Copy)]
pub struct LinkShape {
    /// Mean one-way delay of the packets the host sends.
    pub delay: Duration,
    /// Each packet's delay is uniform in `delay ± jitter`.
    pub jitter: Duration,
    /// Fraction of packets lost, in each direction.
    pub loss: f64,
}

/// A switch and its hosts, removed when dropped.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    hosts: Vec<String>,
    net: [u8; 3],
    uplink: String,
}

/// Fails with what to do unless this process is root and has `tools`.
pub fn preflight(tools: &[&str]) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    ensure!(
        euid == "0",
        "the netns suite makes network namespaces, veth pairs and firewall rules: run it as root \
         (CI does), e.g. `sudo -E cargo test -p fedtune-tests --test netns_faults`"
    );
    for tool in tools {
        let found = Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success());
        ensure!(found, "`{tool}` is missing: run scripts/system-deps.sh (it installs the test tools)");
    }
    Ok(())
}

/// Runs `ip ARGS…`, failing with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn run(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("starting {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The process id a lab name was made by, if `name` is a lab's.
fn owner_pid(name: &str) -> Option<u32> {
    let digits: String = name.strip_prefix(PREFIX)?.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `kill -9` of every process in namespace `ns` (best effort: they may be exiting already).
fn kill_all_in(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-9").args(&pids).output();
        }
    }
}

/// Removes the namespaces (and the processes still in them: a killed test run leaves its
/// coordinator and clients running) and uplinks of labs whose process is gone.
fn remove_stale() -> Result<()> {
    let gone = |name: &str| owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    for line in ip(&["netns", "list"])?.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if gone(name) {
            kill_all_in(name);
            ip(&["netns", "delete", name])?;
        }
    }
    for line in ip(&["-o", "link", "show"])?.lines() {
        // `7: ftn123u0@if2: <…`
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        let name = name.split('@').next().unwrap_or_default();
        if gone(name) {
            ip(&["link", "delete", name])?;
        }
    }
    Ok(())
}

impl Lab {
    /// A switch with one namespace per name in `hosts`, each with `eth0` at [`Lab::addr`], and
    /// the root namespace on the switch at `…254`.
    pub fn new(hosts: &[&str]) -> Result<Self> {
        static LABS: AtomicU32 = AtomicU32::new(0);
        preflight(&["ip"])?;
        remove_stale()?;
        let (pid, k) = (std::process::id(), LABS.fetch_add(1, Ordering::Relaxed));
        ensure!(k < 100, "a test process makes at most 100 labs (their uplink names must fit 15 bytes)");
        // One /24 per lab, from 10.200.0.0/13 by process and lab number: two test processes
        // running the suite at once route different subnets through their uplinks.
        let index = (pid.wrapping_mul(8).wrapping_add(k)) % (8 * 256);
        let net = [10, 200 + (index / 256) as u8, (index % 256) as u8];
        let mut lab = Self {
            tag: format!("{PREFIX}{pid}n{k}"),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            net,
            uplink: format!("{PREFIX}{pid}u{k}"),
        };
        let distinct: HashSet<&String> = lab.hosts.iter().collect();
        ensure!(distinct.len() == lab.hosts.len() && lab.hosts.len() < 250, "host names must be distinct");
        // From here on a failure drops `lab`, which removes what was made so far.
        lab.build().with_context(|| format!("building lab {}", lab.tag))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let switch = self.switch();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, host) in self.hosts.clone().iter().enumerate() {
            let ns = self.ns(host);
            let port = format!("p{i}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &port, "netns", &switch, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.addr(host)?), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        ip(&["link", "add", &self.uplink, "type", "veth", "peer", "name", "up0", "netns", &switch])?;
        ip(&["-n", &switch, "link", "set", "up0", "master", "br0", "up"])?;
        let [a, b, c] = self.net;
        ip(&["addr", "add", &format!("{a}.{b}.{c}.254/24"), "dev", &self.uplink])?;
        ip(&["link", "set", &self.uplink, "up"])?;
        Ok(())
    }

    fn switch(&self) -> String {
        format!("{}-switch", self.tag)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn index(&self, host: &str) -> Result<usize> {
        self.hosts.iter().position(|h| h == host).with_context(|| format!("no host `{host}` in the lab"))
    }

    /// The address of `host` (its `eth0`).
    pub fn addr(&self, host: &str) -> Result<Ipv4Addr> {
        let [a, b, c] = self.net;
        Ok(Ipv4Addr::new(a, b, c, self.index(host)? as u8 + 1))
    }

    /// `program` to run inside `host` (`ip netns exec`, which execs it: the child's pid is the
    /// program's own).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        c
    }

    /// Cuts `host`'s cable: its switch port goes down, so nothing reaches it or leaves it (its
    /// own `eth0` loses carrier, exactly as when the cable is pulled).
    pub fn cut(&self, host: &str) -> Result<()> {
        ip(&["-n", &self.switch(), "link", "set", &format!("p{}", self.index(host)?), "down"])?;
        Ok(())
    }

    /// Plugs `host`'s cable back in.
    pub fn restore(&self, host: &str) -> Result<()> {
        ip(&["-n", &self.switch(), "link", "set", &format!("p{}", self.index(host)?), "up"])?;
        Ok(())
    }

    /// `kill -9` of every process in `host`'s namespace, as when the machine loses power.
    /// Returns how many there were.
    pub fn kill_host(&self, host: &str) -> Result<usize> {
        let pids = ip(&["netns", "pids", &self.ns(host)])?;
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !pids.is_empty() {
            run(Command::new("kill").arg("-9").args(&pids))?;
        }
        Ok(pids.len())
    }

    /// Delay and loss on `host`'s link, in the kernel's packet path: its outgoing packets go
    /// through NFQUEUE `queue` to `netem_queue` (the binary at `netem_queue`, started inside
    /// the host, logging to `log`), which holds each for `shape.delay ± shape.jitter` and drops
    /// `shape.loss` of them; incoming packets are dropped at the same rate by `iptables -m
    /// statistic`. The returned process must outlive the shaping: a packet queued to no
    /// listener is dropped.
    pub async fn shape(
        &self,
        host: &str,
        shape: LinkShape,
        queue: u16,
        netem_queue: &Path,
        log: &Path,
    ) -> Result<Proc> {
        preflight(&["iptables"])?;
        let mut command = self.command(host, netem_queue);
        command.args(["--queue", &queue.to_string()]);
        command.args(["--delay-ms", &shape.delay.as_millis().to_string()]);
        command.args(["--jitter-ms", &shape.jitter.as_millis().to_string()]);
        command.args(["--loss", &shape.loss.to_string()]);
        command.args(["--seed", &(u64::from(queue) + 1).to_string()]);
        let mut proc = Proc::spawn(command, log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !proc.log_text().contains("bound to queue") {
            if let Ok(status) = proc.wait(Duration::ZERO).await {
                bail!("netem_queue in {host} exited with {status}: {}", proc.log_text());
            }
            ensure!(tokio::time::Instant::now() < deadline, "netem_queue in {host} did not bind within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let iptables = |args: &[&str]| run(self.command(host, "iptables").args(args));
        iptables(&["-A", "OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", &queue.to_string()])?;
        if shape.loss > 0.0 {
            let p = shape.loss.to_string();
            iptables(&[
                "-A",
                "INPUT",
                "-i",
                "eth0",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ])?;
        }
        Ok(proc)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A process still inside keeps its namespace (and its veths and addresses) alive after
        // `ip netns delete`: kill them first, so everything goes at once.
        let mut names = self.hosts.iter().map(|h| self.ns(h)).collect::<Vec<_>>();
        names.push(self.switch());
        for ns in &names {
            kill_all_in(ns);
        }
        for ns in &names {
            let _ = ip(&["netns", "delete", ns]);
        }
        // Gone with the switch namespace's end of it; deleted here only if that failed.
        let _ = Command::new("ip").args(["link", "delete", &self.uplink]).output();
    }
}
