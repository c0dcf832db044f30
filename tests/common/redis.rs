//! Real `redis-server` processes of a test's own (installed by `.ci/run`): a standalone
//! server, optionally with TLS and ACL users, and a Redis Cluster of several processes.
//! Ports are ephemeral, nothing is persisted, everything is killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{closed_port, DiesWithTest};

/// One `redis-server` process; killed on drop.
pub struct RedisNode {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisNode {
    /// Starts `redis-server` with `lines` as its configuration file (plus port, no
    /// persistence, its own directory) and waits until it accepts connections.
    pub fn start(port: u16, lines: &[String]) -> RedisNode {
        let dir = tempfile::tempdir().unwrap();
        let mut conf = format!(
            "bind 127.0.0.1\nport {port}\nsave \"\"\nappendonly no\ndir {}\n",
            dir.path().display()
        );
        for l in lines {
            conf.push_str(l);
            conf.push('\n');
        }
        let conf_path = dir.path().join("redis.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("redis-server")
            .dies_with_test()
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (installed by .ci/run)");
        let node = RedisNode {
            child: Some(child),
            port,
            _dir: dir,
        };
        let listen_port = lines
            .iter()
            .find_map(|l| l.strip_prefix("tls-port "))
            .map_or(port, |p| p.parse().unwrap());
        wait_listening(listen_port);
        node
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// EVALSHA calls the server on `port` has served (`INFO commandstats`).
pub fn evalsha_calls(port: u16) -> u64 {
    let info = cli(port, &["INFO", "commandstats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a number of calls"))
}

/// Runs `redis-cli -p port args...` and returns what it printed.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (installed with redis-server)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A Redis Cluster of `masters` masters with `replicas` replicas each, made by
/// `redis-cli --cluster create`. Failover is fast (`cluster-node-timeout 1000`).
pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisNode> = (0..masters * (1 + replicas))
            .map(|_| {
                let port = closed_port();
                let bus = closed_port();
                RedisNode::start(
                    port,
                    &[
                        "cluster-enabled yes".into(),
                        format!("cluster-port {bus}"),
                        "cluster-config-file nodes.conf".into(),
                        "cluster-node-timeout 1000".into(),
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes };
        c.wait_ok(Duration::from_secs(30));
        c
    }

    /// Waits until every live node says `cluster_state:ok` and every master has its replicas.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            // A replica that never synced with its master cannot be promoted.
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let replication = cli(n.port, &["info", "replication"]);
                cli(n.port, &["cluster", "info"]).contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    /// The live node answering `cluster nodes` first (any node knows the whole topology).
    fn any_live(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
            .port
    }

    /// Port of the master serving `key`'s slot now; `None` while its master is failing
    /// and no replica has been promoted yet.
    pub fn master_of(&self, key: &str) -> Option<u16> {
        let port = self.any_live();
        let slot: u16 = cli(port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        for line in cli(port, &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                    if (a..=b).contains(&slot) {
                        let addr = f[1].split('@').next().unwrap();
                        return Some(addr.rsplit(':').next().unwrap().parse().unwrap());
                    }
                }
            }
        }
        None
    }

    /// Ports of the live masters.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| cli(n.port, &["role"]).starts_with("master"))
            .map(|n| n.port)
            .collect()
    }

    pub fn kill(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port")
            .kill();
    }
}

/// Keys a node holds (test-sized databases only: `KEYS *`).
pub fn keys(port: u16) -> Vec<String> {
    cli(port, &["keys", "*"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Writes `ca.pem`, `server.crt`, `server.key` for a TLS `redis-server` on 127.0.0.1
/// (and `localhost`) into `dir`; returns the CA's PEM path.
pub fn tls_files(dir: &Path) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    dir.join("ca.pem")
}
