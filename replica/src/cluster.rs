//! Local clusters of replica processes on loopback: the files they need (keys, view, configs),
//! starting and stopping the processes, and reading their HTTP endpoints. Used by
//! `kmmr-replica local`, the multi-process tests and the benchmarks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use crate::node::{NodeConfig, ProtocolConfig, ServiceChoice};
use kmmr_client::files::{save_key, ViewFile};
use kmmr_client::status::{split_url, MAX_METRICS_RESPONSE};
use kmmr_protocol::crypto::KeyPair;
use kmmr_protocol::view::{default_f, Member, View};
use kmmr_protocol::wire::ids::{ReplicaId, ViewId};

/// What to lay out.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub n: usize,
    /// Replaced if it exists, unless it is not a cluster directory or its cluster is running
    /// (see [`check_replaceable`]).
    pub dir: PathBuf,
    /// Replica i listens on base_port+i, its clients on base_port+1000+i, HTTP on +2000+i.
    pub base_port: u16,
    /// Ids of the replicas that will run a Byzantine test mode (checked against f).
    pub byzantine: Vec<u32>,
    /// Written into every replica's config.
    pub protocol: ProtocolConfig,
    /// Written into every replica's config (`NodeConfig::busy_poll_us`).
    pub busy_poll_us: u64,
}

/// The file holding the admin key pair of a prepared cluster (it signs reconfigurations).
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// A base port at which `ids` replicas can listen (replica, client and HTTP ports, see
/// [`ClusterSpec::base_port`]), all free on loopback when asked. Tests run side by side with
/// other programs on one machine, so they never assume a fixed port is free.
///
/// The layout is checked free by binding every port once, but a replica binds it later, so the
/// range is taken below the kernel's ephemeral range: there, the outgoing connections of tests
/// running in parallel (which get ephemeral local ports) cannot take a port in between, as they
/// did in CI. Ranges handed out by this process are remembered, so two tests of one binary
/// never get overlapping layouts.
pub fn free_base_port(ids: usize) -> Result<u16> {
    // (base, ids) of every layout handed out by this process.
    static HANDED_OUT: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    let ids = u16::try_from(ids).context("too many replicas for one machine's ports")?;
    let span = 2000u16
        .checked_add(ids)
        .context("too many replicas for one machine's ports")?;
    let (low, high) = non_ephemeral_range();
    let (low, high) = if high <= low || high - low <= span {
        (10000, u16::MAX) // an ephemeral range that leaves no room: probing is all there is
    } else {
        (low, high)
    };
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    // Spread the starting points by process and time, so that concurrent test binaries and
    // runs rarely probe the same ranges.
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for _ in 0..256 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let candidate = low + ((seed >> 33) % u64::from(high - low - span)) as u16;
        if handed_out
            .iter()
            .any(|&(base, n)| layouts_overlap(base, n, candidate, ids))
        {
            continue;
        }
        let ports =
            (0..ids).flat_map(|i| [candidate + i, candidate + 1000 + i, candidate + 2000 + i]);
        let held: std::io::Result<Vec<_>> = ports
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)))
            .collect();
        if held.is_ok() {
            handed_out.push((candidate, ids));
            return Ok(candidate);
        }
    }
    bail!("found no free range of ports for {ids} replicas on 127.0.0.1")
}

/// Lays out `spec` like [`prepare`], at a base port from [`free_base_port`] (with room for
/// `spare` more ids), which it writes into `spec`. A port checked free can be taken by another
/// program before [`prepare`] checks it again (a CI run once saw it), so a layout whose ports
/// were taken in between is given up for another, a few times.
pub fn prepare_at_free_ports(spec: &mut ClusterSpec, spare: usize) -> Result<View> {
    let mut last = None;
    for _ in 0..5 {
        spec.base_port = free_base_port(spec.n + spare)?;
        match prepare(spec) {
            Err(e) if e.is::<PortInUse>() => {
                tracing::warn!("{e}; laying the cluster out at other ports");
                last = Some(e);
            }
            done => return done,
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("found no free ports")))
}

/// A port that [`check_ports_free`] found taken.
#[derive(Debug, thiserror::Error)]
#[error(
    "port {port} (replica {replica}'s {what} port) is in use{}",
    why.explain()
)]
pub struct PortInUse {
    pub port: u16,
    pub replica: usize,
    pub what: &'static str,
    pub why: Held,
}

/// What holds a port that [`check_ports_free`] found in use, as far as the machine tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Most likely a listener: a cluster already running, say.
    Taken,
    /// A connection that closed in the last minute holds it in TIME_WAIT.
    TimeWait,
    /// Something else, in the range outgoing connections take their ports from.
    Ephemeral,
}

impl Held {
    fn explain(self) -> &'static str {
        match self {
            Held::Taken => {
                ", perhaps by a cluster already running: stop it, or choose another --base-port"
            }
            Held::TimeWait => {
                " by a connection that closed within the last minute (TIME_WAIT): choose another \
                 --base-port, preferably below the kernel's ephemeral range \
                 (/proc/sys/net/ipv4/ip_local_port_range), from which outgoing connections take \
                 their ports, or wait a minute"
            }
            Held::Ephemeral => {
                ": choose another --base-port, preferably below the kernel's ephemeral range \
                 (/proc/sys/net/ipv4/ip_local_port_range), from which outgoing connections take \
                 their ports"
            }
        }
    }
}

/// Whether two layouts share a port. A layout is three blocks of `ids` ports, at its base and
/// 1000 and 2000 above, so layouts interleave: comparing whole spans, as this once did, let a
/// test binary with a dozen clusters run out of room below the ephemeral range.
fn layouts_overlap(a: u16, a_ids: u16, b: u16, b_ids: u16) -> bool {
    let (a, b) = (i32::from(a), i32::from(b));
    [-2000, -1000, 0, 1000, 2000]
        .iter()
        .any(|shift| a < b + shift + i32::from(b_ids) && b + shift < a + i32::from(a_ids))
}

/// The kernel's range of ports for the local end of outgoing connections (Linux's
/// `ip_local_port_range`; 32768-60999 when it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut parts = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Ports that the kernel does not hand out to outgoing connections: from 10000 to the start of
/// its ephemeral range, or above its end when that leaves more room.
fn non_ephemeral_range() -> (u16, u16) {
    let ephemeral = ephemeral_range();
    let below = (10000, ephemeral.0.max(10000));
    let above = (ephemeral.1.saturating_add(1), u16::MAX);
    if above.1.saturating_sub(above.0) > below.1.saturating_sub(below.0) {
        above
    } else {
        below
    }
}

/// The HTTP port of replica `i`.
pub fn http_port(base: u16, i: usize) -> u16 {
    base + 2000 + i as u16
}

/// Writes keys (the replicas' and the admin's), the view and one config per replica. Client
/// commands keep their keys in `client-keys/` (see the CLI's `keys`).
pub fn prepare(args: &ClusterSpec) -> Result<View> {
    let f = default_f(args.n);
    if args.n < 4 {
        bail!(
            "--n {} is too small: BFT needs n >= 4 (n = 3f+1 with f >= 1)",
            args.n
        );
    }
    if args.byzantine.len() > f {
        bail!(
            "{} Byzantine replicas exceed f = {} for n = {}: the cluster could not stay correct",
            args.byzantine.len(),
            f,
            args.n
        );
    }
    check_replaceable(&args.dir)?;
    check_ports_free(args.base_port, args.n)?;
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("clearing {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let mut members = Vec::new();
    for i in 0..args.n {
        let key = KeyPair::generate(&mut rand::rngs::OsRng);
        save_key(&key, &args.dir.join(format!("r{i}.key")))?;
        members.push(Member {
            id: ReplicaId(i as u32),
            address: format!("127.0.0.1:{}", args.base_port + i as u16),
            key: key.public(),
        });
    }
    let admin = KeyPair::generate(&mut rand::rngs::OsRng);
    save_key(&admin, &args.dir.join(ADMIN_KEY_FILE))?;
    let view = View::new(ViewId(0), f, members)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_admin(Some(admin.public()));
    ViewFile::save(&view, &args.dir.join("view.toml"))?;
    for i in 0..args.n {
        let cfg = NodeConfig {
            id: i as u32,
            key_file: PathBuf::from(format!("r{i}.key")),
            view_file: PathBuf::from("view.toml"),
            data_dir: PathBuf::from(format!("data/r{i}")),
            listen: None,
            client_listen: None,
            http_listen: format!("127.0.0.1:{}", http_port(args.base_port, i)),
            busy_poll_us: args.busy_poll_us,
            protocol: args.protocol.clone(),
            initial_state: None,
            max_peer_protocol: 2,
        };
        cfg.validate()?;
        std::fs::write(
            args.dir.join(format!("r{i}.toml")),
            toml::to_string_pretty(&cfg)?,
        )?;
    }
    Ok(view)
}

/// The copy of the backup a restored cluster started from, in its directory.
pub const INITIAL_STATE_FILE: &str = "initial-state.kmmr";

/// Makes every replica of a directory laid out by [`prepare`] start from the backup `bytes`
/// (already verified by the caller): one copy in the directory, named by every config.
pub fn set_initial_state(dir: &Path, n: usize, bytes: &[u8]) -> Result<()> {
    std::fs::write(dir.join(INITIAL_STATE_FILE), bytes)
        .with_context(|| format!("writing {}", dir.join(INITIAL_STATE_FILE).display()))?;
    for i in 0..n {
        let path = dir.join(format!("r{i}.toml"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: NodeConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // Relative to the config file, as the other paths are.
        cfg.initial_state = Some(PathBuf::from(INITIAL_STATE_FILE));
        std::fs::write(&path, toml::to_string_pretty(&cfg)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The view file of a directory laid out by [`prepare`]: what marks it as one.
const VIEW_FILE: &str = "view.toml";

/// Refuses to replace `dir` unless it is missing, empty, or a cluster laid out by [`prepare`]
/// none of whose replicas answers on its ports: a directory of some other use, or the keys and
/// view of a cluster still running (which nothing could reach any more), is never deleted.
pub fn check_replaceable(dir: &Path) -> Result<()> {
    let Ok(mut entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    if entries.next().is_none() {
        return Ok(());
    }
    if !dir.join(VIEW_FILE).exists() {
        bail!(
            "{} exists and is not a cluster directory made by `kmmr-replica local` (it has no \
             {VIEW_FILE}); refusing to replace it: choose another --dir",
            dir.display()
        );
    }
    for (id, addr) in replica_addresses(dir) {
        if answers(&addr) {
            bail!(
                "{} belongs to a running cluster (replica {id} answers on {addr}); refusing to \
                 replace it: stop that cluster first, or choose another --dir",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The status addresses of the replicas configured in a cluster directory, by id.
fn replica_addresses(dir: &Path) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with('r') && name.ends_with(".toml")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| toml::from_str::<NodeConfig>(&t).ok())
        .map(|c| (c.id, c.http_listen))
        .collect()
}

/// Whether something accepts connections at `addr`.
fn answers(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .into_iter()
        .flatten()
        .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// Refuses a layout whose ports are taken, before anything is written: replicas that cannot
/// bind would fail one by one with "address already in use" after the files were replaced.
///
/// A port that a listener holds is refused at once (a cluster already running, say), and so is
/// one held in TIME_WAIT, which lasts a minute: outgoing connections take their local ports from
/// the kernel's ephemeral range (32768-60999 by default), and a closed one that never set
/// SO_REUSEADDR keeps any listener off its port meanwhile. This project's own connections set it
/// (`kmmr_net`'s dial), so only other programs' do that (before, 13-17 of 100 random base ports
/// in that range after a hundred earlier starts). A port held by a connection still closing gets
/// a moment to come free. The error says which it was.
pub fn check_ports_free(base_port: u16, n: usize) -> Result<()> {
    for i in 0..n {
        let i16 = u16::try_from(i).context("too many replicas for one machine's ports")?;
        for (what, offset) in [("replica", 0u16), ("client", 1000), ("HTTP", 2000)] {
            let Some(port) = base_port
                .checked_add(offset)
                .and_then(|p| p.checked_add(i16))
            else {
                bail!("--base-port {base_port} leaves no room for {n} replicas' ports");
            };
            if !comes_free(port, PORT_GRACE) {
                return Err(PortInUse {
                    port,
                    replica: i,
                    what,
                    why: if kmmr_net::port_in_time_wait(port) {
                        Held::TimeWait
                    } else if in_ephemeral_range(port) {
                        Held::Ephemeral
                    } else {
                        Held::Taken
                    },
                }
                .into());
            }
        }
    }
    Ok(())
}

/// How long a port held by connections (not by a listener) may take to come free.
const PORT_GRACE: Duration = Duration::from_secs(3);

/// Whether `port` can be bound on loopback now or, when no listener holds it, within `grace`.
fn comes_free(port: u16, grace: Duration) -> bool {
    let bindable = || std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    if bindable() {
        return true;
    }
    // A listener, or a connection that closed within the last minute (TIME_WAIT lasts 60 s on
    // Linux): neither goes away in a moment.
    if answers(&format!("127.0.0.1:{port}")) || kmmr_net::port_in_time_wait(port) {
        return false;
    }
    let until = Instant::now() + grace;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        if bindable() {
            return true;
        }
    }
    false
}

fn in_ephemeral_range(port: u16) -> bool {
    let (low, high) = ephemeral_range();
    (low..=high).contains(&port)
}

/// Starts replica `i` of a prepared cluster directory as a child process of `exe` (the
/// `kmmr-replica` binary), logging to `<dir>/r<i>.log`. The process dies with the handle.
pub fn spawn_replica(
    exe: &Path,
    dir: &Path,
    i: u32,
    service: ServiceChoice,
    byzantine: Option<&str>,
    threads: usize,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("r{i}.log")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--threads")
        .arg(threads.to_string())
        .arg("run")
        .arg("--config")
        .arg(dir.join(format!("r{i}.toml")))
        .arg("--service")
        .arg(match service {
            ServiceChoice::Kv => "kv",
            ServiceChoice::Noop => "noop",
        })
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(mode) = byzantine {
        cmd.arg("--byzantine")
            .arg(mode)
            .arg("--i-know-this-breaks-the-replica");
    }
    cmd.spawn().with_context(|| format!("starting replica {i}"))
}

pub async fn wait_healthy(base_port: u16, i: usize, within: Duration) -> Result<()> {
    let url = format!("http://127.0.0.1:{}/healthz", http_port(base_port, i));
    let until = Instant::now() + within;
    loop {
        if http_get(&url).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("replica {i} did not become healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET` of an `http://host:port/path` URL on a replica's HTTP port (`/metrics`, `/healthz`): the
/// body of a 200 response as text. A replica may be Byzantine: what it sends back is bounded in
/// size and time like any other input.
pub async fn http_get(url: &str) -> Result<String> {
    let (addr, path) = split_url(url)?;
    let body =
        kmmr_client::status::http_get(addr, &path, HTTP_TIMEOUT, MAX_METRICS_RESPONSE).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// How long a read of a replica's HTTP endpoint may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::layouts_overlap;

    #[test]
    fn layouts_overlap_only_when_they_share_a_port() {
        // Replica, client and HTTP blocks of 4 at 20000, 21000, 22000.
        assert!(layouts_overlap(20000, 4, 20003, 4));
        assert!(
            layouts_overlap(20000, 4, 21002, 4),
            "its replica block meets our client block"
        );
        assert!(
            layouts_overlap(20000, 4, 18000, 4),
            "its HTTP block is our replica block"
        );
        assert!(!layouts_overlap(20000, 4, 20004, 4));
        assert!(!layouts_overlap(20000, 4, 20500, 4));
        assert!(!layouts_overlap(20000, 4, 19996, 4));
        assert!(!layouts_overlap(20000, 4, 23000, 4));
    }
}
