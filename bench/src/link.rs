//! Link profiles for the benchmark: this kernel has no netem, so a profile is built from a
//! network namespace for the source joined by a veth pair (rate: `htb` on both ends, with
//! packets marked DSCP EF, the urgent connection's, in a class served first, as a network
//! that honours DSCP does; `tbf` alone would queue fault replies behind up to 20 ms of bulk
//! data) and a delay line of ours in front of it (one-way delay and stalls: it holds every
//! chunk it forwards for the delay, in order). Nothing is sent outside the namespace pair:
//! the source side's address exists only inside it, the delay line listens on loopback.
//!
//! ```text
//! faultd ──loopback──► delay line ──veth (tbf)──► [netns pm-PID-N] pagesrv
//! ```
//!
//! The delay line's threads run SCHED_FIFO above the daemons' fault path: the link is
//! hardware in this emulation, and must not queue the pair's bytes behind the pair's own
//! CPU use (on 2 CPUs the push would otherwise delay urgent replies inside the "link").
//!
//! Namespaces are named `pm-<pid>-<n>`; a [`Link`] removes its own on drop, an interrupted
//! bench removes them from its signal thread ([`clean_up_on_interrupt`]), and every bench
//! start removes those of bench processes that are gone ([`remove_stale`]).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;

/// The profiles `--link` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LinkChoice {
    /// Plain loopback (no namespace, no delay).
    Loopback,
    /// 10 Gbit/s, 50 µs one way.
    Dc,
    /// 1 Gbit/s, 5 ms one way.
    Wan,
    /// dc with a 20 ms stall every 500 ms (what retransmission timeouts look like).
    Stall,
    /// Every profile, one after the other.
    All,
}

/// A link profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Its name in the report.
    pub name: &'static str,
    /// Rate in bits per second (`None`: loopback, unshaped).
    pub rate_bit_s: Option<u64>,
    /// One-way delay added by the delay line.
    pub one_way: Duration,
    /// A stall of `.1` every `.0`, in both directions.
    pub stall: Option<(Duration, Duration)>,
}

impl Profile {
    const LOOPBACK: Profile = Profile {
        name: "loopback",
        rate_bit_s: None,
        one_way: Duration::ZERO,
        stall: None,
    };
    const DC: Profile = Profile {
        name: "dc",
        rate_bit_s: Some(10_000_000_000),
        one_way: Duration::from_micros(50),
        stall: None,
    };
    const WAN: Profile = Profile {
        name: "wan",
        rate_bit_s: Some(1_000_000_000),
        one_way: Duration::from_millis(5),
        stall: None,
    };
    const STALL: Profile = Profile {
        name: "stall",
        stall: Some((Duration::from_millis(500), Duration::from_millis(20))),
        ..Profile::DC
    };

    /// The profiles a `--link` choice names, in order.
    pub fn chosen(choice: LinkChoice) -> Vec<Profile> {
        match choice {
            LinkChoice::Loopback => vec![Profile::LOOPBACK],
            LinkChoice::Dc => vec![Profile::DC],
            LinkChoice::Wan => vec![Profile::WAN],
            LinkChoice::Stall => vec![Profile::STALL],
            LinkChoice::All => vec![Profile::LOOPBACK, Profile::DC, Profile::WAN, Profile::STALL],
        }
    }

    /// Whether the profile needs a namespace and a delay line.
    pub fn is_shaped(&self) -> bool {
        self.rate_bit_s.is_some()
    }

    /// The link rate in MiB/s (payload ceiling), if shaped.
    pub fn rate_mib_s(&self) -> Option<f64> {
        self.rate_bit_s.map(|b| b as f64 / 8.0 / 1048576.0)
    }
}

/// Prefix of our namespaces and veth names.
const PREFIX: &str = "pm-";
/// The port the source listens on inside its namespace (nothing else is there).
pub const SOURCE_PORT: u16 = 7070;
/// A second port inside the namespace, for the floor's page server.
pub const FLOOR_PORT: u16 = 7071;

static LINKS: AtomicU64 = AtomicU64::new(0);

/// Held while a link is built or removed: the signal thread takes it before it removes our
/// namespaces, so no `ip` command of ours finishes after the bench is gone.
static SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// SCHED_FIFO priority of the delay line's threads: above the daemons' fault path (1).
const LINK_PRIORITY: i32 = 2;

/// A shaped path to a namespace: created by [`Link::up`], removed on drop.
#[derive(Debug)]
pub struct Link {
    /// The profile.
    pub profile: Profile,
    netns: String,
    veth: String,
    /// The source side's address (inside the namespace).
    pub source_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    run_iproute2("ip", args)
}

fn tc(args: &[&str]) -> Result<()> {
    run_iproute2("tc", args)
}

/// Runs `ip` or `tc`; its stderr is the error.
fn run_iproute2(tool: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(tool).args(args).output().with_context(|| {
        format!("cannot run `{tool}` (install iproute2: scripts/ensure-deps.sh does)")
    })?;
    ensure!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A /30 in 10.201.0.0/16 that no interface here uses (several benches may run at once),
/// as (our address, the source's address). The search starts at a place derived from our
/// pid and link number, so two benches starting together rarely even look at the same one.
fn free_subnet(n: u64) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("cannot run `ip`")?;
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = (u64::from(std::process::id()) * 64 + n) % 16384;
    for i in 0..16384 {
        let k = ((start + i) % 16384) as u16;
        let (third, fourth) = ((k >> 6) as u8, ((k & 63) * 4) as u8);
        let net = format!("10.201.{third}.");
        let taken = used.lines().any(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|a| a.strip_prefix(&net))
                .and_then(|rest| rest.split('/').next()?.parse::<u8>().ok())
                .is_some_and(|last| last & !3 == fourth)
        });
        if !taken {
            return Ok((
                Ipv4Addr::new(10, 201, third, fourth + 1),
                Ipv4Addr::new(10, 201, third, fourth + 2),
            ));
        }
    }
    bail!("no free /30 left in 10.201.0.0/16")
}

/// Shapes `dev` (in namespace `ns`) to `rate` bit/s with htb: one class for packets marked
/// DSCP EF (the urgent connection's), served first, and one for the rest, each with a
/// queue of 20 ms at the rate (what a switch that honours DSCP does at a congested port).
fn shape(ns: Option<&str>, dev: &str, rate: u64) -> Result<()> {
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = ns.map(|n| vec!["-n", n]).unwrap_or_default();
        all.extend_from_slice(args);
        tc(&all)
    };
    let (rate_s, tenth, rest) = (
        format!("{rate}bit"),
        format!("{}bit", rate / 10),
        format!("{}bit", rate - rate / 10),
    );
    // A burst of 1 ms at the rate (the kernel's timer cannot shape finer), at least 64 KiB.
    let burst = (rate / 8 / 1000).max(64 << 10).to_string();
    let queue = (rate / 8 / 50).max(256 << 10).to_string();
    let quantum = "60000";
    run(&[
        "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20",
    ])?;
    run(&[
        "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate_s,
        "burst", &burst, "cburst", &burst, "quantum", quantum,
    ])?;
    for (class, share, prio) in [("1:10", &tenth, "0"), ("1:20", &rest, "1")] {
        run(&[
            "class", "add", "dev", dev, "parent", "1:1", "classid", class, "htb", "rate", share,
            "ceil", &rate_s, "burst", &burst, "cburst", &burst, "prio", prio, "quantum", quantum,
        ])?;
        let leaf = format!("{}:", &class[2..]);
        run(&[
            "qdisc", "add", "dev", dev, "parent", class, "handle", &leaf, "bfifo", "limit", &queue,
        ])?;
    }
    let ef = format!("{:#04x}", common::netopt::TOS_URGENT);
    run(&[
        "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
        "ip", "tos", &ef, "0xfc", "flowid", "1:10",
    ])
}

/// Our namespaces now present (all bench processes').
pub fn our_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// The pid a namespace name carries.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn remove(netns: &str) {
    // The root side of the pair goes first (at once); deleting the namespace takes its
    // side with it.
    let _ = ip(&["link", "del", &format!("{netns}-a")]);
    let _machine_wide = common::netns::lock();
    let _ = ip(&["netns", "del", netns]);
}

/// Removes the namespaces of bench processes that are gone (an earlier run killed before
/// it could clean up).
pub fn remove_stale() {
    for name in our_namespaces() {
        if owner(&name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            remove(&name);
        }
    }
}

/// Removes this process's namespaces.
pub fn remove_ours() {
    let pid = std::process::id();
    for name in our_namespaces() {
        if owner(&name) == Some(pid) {
            remove(&name);
        }
    }
}

/// Makes SIGINT and SIGTERM stop this process's daemons, remove its namespaces and give
/// back reserved huge pages before it exits (status 130).
/// Call before any other thread starts: the signals are blocked in every thread and taken
/// by one that waits for them.
///
/// # Errors
/// The signal mask cannot be set.
pub fn clean_up_on_interrupt() -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).context("block SIGINT/SIGTERM")?;
    std::thread::spawn(move || {
        if let Ok(signal) = set.wait() {
            eprintln!("bench: {signal:?}: removing the link namespaces and stopping");
            // Not released: no link is built after this.
            let _setup = SETUP.lock().unwrap_or_else(|p| p.into_inner());
            crate::procs::kill_children();
            remove_ours();
            crate::hugetlb::give_back();
            crate::procs::remove_leftovers();
            std::process::exit(130);
        }
    });
    Ok(())
}

impl Link {
    /// Builds the path of `profile` (a namespace, a veth pair, tbf on both ends).
    ///
    /// # Errors
    /// `ip` or `tc` failing (not root, no iproute2, no veth or tbf in the kernel).
    pub fn up(profile: Profile) -> Result<Link> {
        let rate = profile.rate_bit_s.context("loopback needs no link")?;
        let _setup = SETUP.lock().unwrap_or_else(|p| p.into_inner());
        let n = LINKS.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{PREFIX}{}-{n}", std::process::id());
        ensure!(
            netns.len() <= 13,
            "namespace name {netns} too long for a veth"
        );
        let (ours, source_ip) = free_subnet(n)?;
        let link = Link {
            profile,
            veth: format!("{netns}-a"),
            netns,
            source_ip,
        };
        // From here on, drop removes whatever was made.
        let peer = format!("{}-b", link.netns);
        {
            // One process at a time on this machine: the first `ip netns add` makes
            // /run/netns a mount point, and two first uses race (common::netns).
            let _machine_wide = common::netns::lock().context("the namespace lock")?;
            ip(&["netns", "add", &link.netns])?;
        }
        ip(&[
            "link", "add", &link.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &link.netns])?;
        ip(&["addr", "add", &format!("{ours}/30"), "dev", &link.veth])?;
        ip(&["link", "set", &link.veth, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", &link.netns];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{source_ip}/30"), "dev", &peer])?;
        inside(&["link", "set", &peer, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        for ns in [None, Some(link.netns.as_str())] {
            let dev = if ns.is_some() { &peer } else { &link.veth };
            shape(ns, dev, rate)?;
        }
        Ok(link)
    }

    /// Where the source listens inside the namespace.
    pub fn source_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.source_ip, port))
    }

    /// The namespace's name (for `ip netns exec`, or [`enter`]).
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

/// Moves the calling thread into network namespace `name` (its sockets are then made
/// there).
///
/// # Errors
/// The namespace is gone or setns is refused.
pub fn enter(name: &str) -> Result<()> {
    let file = std::fs::File::open(format!("/var/run/netns/{name}"))
        .with_context(|| format!("open namespace {name}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter namespace {name}"))?;
    Ok(())
}

impl Drop for Link {
    fn drop(&mut self) {
        let _setup = SETUP.lock().unwrap_or_else(|p| p.into_inner());
        remove(&self.netns);
    }
}

/// A TCP proxy on loopback that forwards to `target` and delays every chunk by the
/// profile's one-way delay in each direction (and stalls, with the stall profile). Runs
/// until dropped.
pub struct DelayLine {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl DelayLine {
    /// Starts the delay line.
    ///
    /// # Errors
    /// Binding a loopback port.
    pub fn start(target: SocketAddr, profile: Profile) -> Result<DelayLine> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let epoch = Instant::now();
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(target) {
                            splice_delayed(client, server, profile, epoch);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(DelayLine { addr, stop })
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Forwards both directions of a connection pair through delayed pumps.
fn splice_delayed(client: TcpStream, server: TcpStream, profile: Profile, epoch: Instant) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    pump(client, server, profile, epoch);
    pump(s2, c2, profile, epoch);
}

/// One direction: a reader stamps each chunk, a writer sends it once its delay passed
/// (and outside the stalls), in order.
fn pump(mut from: TcpStream, mut to: TcpStream, profile: Profile, epoch: Instant) {
    // Holds what the link holds: its rate × (delay + stall), in 64 KiB chunks (so the
    // sender's TCP feels the link, not an endless buffer).
    let held = profile.one_way + profile.stall.map_or(Duration::ZERO, |(_, stall)| stall);
    let bytes = profile.rate_bit_s.unwrap_or(0) as f64 / 8.0 * held.as_secs_f64();
    let chunks = (bytes / f64::from(64 << 10)) as usize + 16;
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(chunks);
    std::thread::spawn(move || {
        // The link is hardware: it never waits for a CPU behind the endpoints.
        let _ = common::sched::realtime_priority_at(LINK_PRIORITY);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Read);
    });
    std::thread::spawn(move || {
        let _ = common::sched::realtime_priority_at(LINK_PRIORITY);
        for (at, chunk) in rx {
            let due = at + profile.one_way;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if let Some((every, stall)) = profile.stall {
                let into = epoch.elapsed().as_nanos() % every.as_nanos();
                if into < stall.as_nanos() {
                    std::thread::sleep(Duration::from_nanos((stall.as_nanos() - into) as u64));
                }
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// Checks that this machine can build links (root, iproute2), before any is needed.
///
/// # Errors
/// What is missing.
pub fn check_available() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("link profiles need root (network namespaces, veth, tc)");
    }
    ip(&["-V"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_what_the_issue_says() {
        let all = Profile::chosen(LinkChoice::All);
        let names: Vec<&str> = all.iter().map(|p| p.name).collect();
        assert_eq!(names, ["loopback", "dc", "wan", "stall"]);
        assert_eq!(Profile::DC.rate_bit_s, Some(10_000_000_000));
        assert_eq!(Profile::WAN.one_way, Duration::from_millis(5));
        assert_eq!(Profile::STALL.one_way, Profile::DC.one_way);
        assert!(!Profile::LOOPBACK.is_shaped());
        assert_eq!(owner("pm-1234-7"), Some(1234));
        assert_eq!(owner("other-1234-7"), None);
    }

    #[test]
    fn the_delay_line_delays_each_way_and_keeps_order() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = echo.accept().unwrap();
            let mut buf = [0u8; 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let profile = Profile {
            one_way: Duration::from_millis(20),
            ..Profile::DC
        };
        let line = DelayLine::start(target, profile).unwrap();
        let mut conn = TcpStream::connect(line.addr()).unwrap();
        let started = Instant::now();
        conn.write_all(b"ping").unwrap();
        conn.write_all(b"pong").unwrap();
        let mut back = [0u8; 8];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"pingpong");
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "{:?}",
            started.elapsed()
        );
    }
}
