//! Network namespaces for partition tests: one namespace per host (etcd,
//! each node), each joined by a veth pair to a bridge in the root
//! namespace, where the test process (the clients) stays. A partition cuts
//! a host off from others in both directions while the bridge's own
//! address (the clients) stays reachable from everywhere, in one of two
//! ways ([`Cut`]): blackhole routes at each sender (its sends fail at once,
//! `EINVAL`), or blackhole policy rules at each receiver matching the
//! sender's address (packets vanish on arrival: peers hear nothing and
//! time out, as across a real partition).
//!
//! Names start with `stp<pid>` (the bridge `stp<pid>br`, root-side veths
//! `stp<pid>h<i>`, namespaces `stp<pid>-<host>`), so concurrent test
//! processes never share one, and what a killed earlier process with the
//! same PID left behind is removed first. The subnet is a private /24 that
//! no address or route of the root namespace uses yet.
//!
//! Creating anything fails the test with `ip`'s own words: these tests
//! need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2, and they do
//! not skip where those are missing. Everything created is removed on drop,
//! on a panic too; kill the processes running inside first.

use std::process::Command;

use parking_lot::Mutex;

/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// How a partition drops packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// A blackhole route to the peer at the sender: sending fails at once.
    Routes,
    /// A blackhole rule for the peer's address at the receiver: nothing
    /// arrives, nothing is refused; connects and streams time out.
    Silent,
}

/// One host: a namespace with one address on the bridge's subnet.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
}

pub struct Netns {
    pub prefix: String,
    pub bridge: String,
    /// The bridge's address in the root namespace: where clients come from.
    pub gateway: String,
    pub hosts: Vec<Host>,
    /// What exists so far, for cleanup (also of a half-built network).
    namespaces: Vec<String>,
    links: Vec<String>,
    /// Blackhole routes in place: `(namespace, destination ip)`.
    blackholes: Mutex<Vec<(String, String)>>,
    /// Blackhole rules in place: `(namespace, source ip)`.
    drops: Mutex<Vec<(String, String)>>,
}

/// Priority of the blackhole rules: before the local table's, which moves
/// from 0 to [`LOCAL_RULE_PREF`] (packets for the host's own address are
/// otherwise delivered before any other rule is read).
const DROP_RULE_PREF: &str = "10";
const LOCAL_RULE_PREF: &str = "100";

/// Run `ip` with `args`: its stderr on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2 is needed on PATH): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`ip {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Run `ip`, failing the test with what went wrong and why.
fn must(what: &str, args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| {
        panic!(
            "cannot set up network namespaces for the partition test: {what}: {e}\n\
             This test needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN: `ip netns add`, veth pairs, a bridge) \
             and iproute2; it fails rather than skip where it cannot create them"
        )
    })
}

impl Netns {
    /// A bridge and one namespace per `(name, last octet of its address)`,
    /// e.g. `[("etcd", 2), ("n1", 11)]`.
    pub fn create(hosts: &[(&str, u8)]) -> Netns {
        let prefix = format!("stp{}", std::process::id());
        let mut net = Netns {
            bridge: format!("{prefix}br"),
            prefix,
            gateway: String::new(),
            hosts: Vec::new(),
            namespaces: Vec::new(),
            links: Vec::new(),
            blackholes: Mutex::new(Vec::new()),
            drops: Mutex::new(Vec::new()),
        };
        assert!(hosts.len() < 10, "one digit per veth in the interface names");
        assert!(net.bridge.len() <= IFNAME_MAX, "interface name {} too long", net.bridge);
        net.remove_leftovers();
        let subnet = free_subnet();
        net.gateway = format!("{subnet}.1");
        // Registered before it exists: a failure half-way still removes it.
        net.links.push(net.bridge.clone());
        must("creating the bridge", &["link", "add", &net.bridge, "type", "bridge"]);
        must("addressing the bridge", &["addr", "add", &format!("{}/24", net.gateway), "dev", &net.bridge]);
        must("bringing the bridge up", &["link", "set", &net.bridge, "up"]);
        for (i, (name, octet)) in hosts.iter().enumerate() {
            let ns = format!("{}-{name}", net.prefix);
            let (outer, inner) = (format!("{}h{i}", net.prefix), format!("{}p{i}", net.prefix));
            let addr = format!("{subnet}.{octet}");
            net.namespaces.push(ns.clone());
            must(&format!("creating namespace {ns}"), &["netns", "add", &ns]);
            net.links.push(outer.clone());
            must(
                &format!("creating the veth pair {outer}/{inner}"),
                &["link", "add", &outer, "type", "veth", "peer", "name", &inner],
            );
            must(&format!("moving {inner} into {ns}"), &["link", "set", &inner, "netns", &ns]);
            must(&format!("renaming {inner} in {ns}"), &["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            must(&format!("addressing {ns}"), &["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            must(&format!("bringing eth0 up in {ns}"), &["-n", &ns, "link", "set", "eth0", "up"]);
            // Servers and etcd talk to themselves over loopback too.
            must(&format!("bringing lo up in {ns}"), &["-n", &ns, "link", "set", "lo", "up"]);
            must(
                &format!("moving the local table's rule in {ns}"),
                &["-n", &ns, "rule", "add", "pref", LOCAL_RULE_PREF, "lookup", "local"],
            );
            must(&format!("moving the local table's rule in {ns}"), &["-n", &ns, "rule", "del", "pref", "0"]);
            must(&format!("attaching {outer} to the bridge"), &["link", "set", &outer, "master", &net.bridge]);
            must(&format!("bringing {outer} up"), &["link", "set", &outer, "up"]);
            net.hosts.push(Host { name: name.to_string(), ns, ip: addr });
        }
        net
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The command prefix that runs a program in `name`'s namespace. `ip
    /// netns exec` execs the program, so its PID is the child's.
    pub fn wrap(&self, name: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.host(name).ns.clone()]
    }

    /// Drop everything `from` sends to `to`'s address (replies included:
    /// a TCP peer `from` cannot answer hears nothing either).
    pub fn blackhole(&self, from: &str, to: &str) {
        let (ns, dest) = (self.host(from).ns.clone(), self.host(to).ip.clone());
        // A /32 wins over the subnet's on-link route; the gateway (the
        // clients) keeps its route.
        must(
            &format!("cutting {from} off from {to}"),
            &["-n", &ns, "route", "add", "blackhole", &format!("{dest}/32")],
        );
        self.blackholes.lock().push((ns, dest));
    }

    /// Drop everything `at` receives from `from`'s address, silently.
    pub fn drop_from(&self, at: &str, from: &str) {
        let (ns, source) = (self.host(at).ns.clone(), self.host(from).ip.clone());
        must(
            &format!("making {at} deaf to {from}"),
            &["-n", &ns, "rule", "add", "pref", DROP_RULE_PREF, "from", &source, "blackhole"],
        );
        self.drops.lock().push((ns, source));
    }

    /// Cut `host` off from each of `others`, both ways.
    pub fn isolate(&self, host: &str, others: &[&str], cut: Cut) {
        for (a, b) in others.iter().flat_map(|other| [(host, *other), (*other, host)]) {
            match cut {
                Cut::Routes => self.blackhole(a, b),
                Cut::Silent => self.drop_from(b, a),
            }
        }
    }

    /// Remove every cut: the network is whole again.
    pub fn heal(&self) {
        let routes = std::mem::take(&mut *self.blackholes.lock());
        for (ns, dest) in routes {
            must(
                &format!("healing the route to {dest} in {ns}"),
                &["-n", &ns, "route", "del", "blackhole", &format!("{dest}/32")],
            );
        }
        let rules = std::mem::take(&mut *self.drops.lock());
        for (ns, source) in rules {
            must(
                &format!("healing the rule for {source} in {ns}"),
                &["-n", &ns, "rule", "del", "pref", DROP_RULE_PREF, "from", &source, "blackhole"],
            );
        }
    }

    /// Namespaces and links named like ours, left by an earlier process
    /// that had our PID and was killed before its cleanup ran.
    fn remove_leftovers(&self) {
        let ours = |name: &str, namespace: bool| {
            let Some(rest) = name.strip_prefix(&self.prefix) else { return false };
            if namespace {
                return rest.starts_with('-');
            }
            rest == "br"
                || (rest.len() > 1
                    && (rest.starts_with('h') || rest.starts_with('p'))
                    && rest[1..].bytes().all(|b| b.is_ascii_digit()))
        };
        if let Ok(list) = ip(&["netns", "list"]) {
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if ours(ns, true) {
                    eprintln!("netns: removing leftover namespace {ns}");
                    let _ = ip(&["netns", "delete", ns]);
                }
            }
        }
        if let Ok(list) = ip(&["-o", "link", "show"]) {
            for line in list.lines() {
                // "12: stp1br: <...>" or "13: stp1h0@if2: <...>"
                let Some(name) = line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("")) else {
                    continue;
                };
                if ours(name, false) {
                    eprintln!("netns: removing leftover link {name}");
                    let _ = ip(&["link", "delete", name]);
                }
            }
        }
    }
}

/// `10.a.b` for a /24 nobody in the root namespace uses: derived from the
/// PID (concurrent test processes start apart), moved on while taken.
fn free_subnet() -> String {
    let used = format!(
        "{}\n{}",
        must("listing addresses", &["-4", "-o", "addr", "show"]),
        must("listing routes", &["-4", "route", "show", "table", "all"])
    );
    let pid = std::process::id();
    let (a, mut b) = (100 + (pid / 254) % 100, pid % 254);
    for _ in 0..254 {
        let subnet = format!("10.{a}.{}", b + 1);
        if !used.contains(&format!("{subnet}.")) {
            return subnet;
        }
        b = (b + 1) % 254;
    }
    panic!("cannot set up network namespaces for the partition test: no free 10.{a}.x.0/24 subnet")
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace destroys its end of the veth, and with it
        // the root end; the explicit deletes catch what a half-built
        // network left. Errors are reported, never raised: this may run
        // while a panic unwinds.
        for ns in &self.namespaces {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
        for link in self.links.iter().rev() {
            let exists = ip(&["link", "show", link]).is_ok();
            if exists {
                if let Err(e) = ip(&["link", "delete", link]) {
                    eprintln!("netns cleanup: {e}");
                }
            }
        }
    }
}
