//! `twinroute-standins`: runs local stand-ins until Ctrl-C.
//!
//! ```text
//! twinroute-standins imds [--listen 127.0.0.1:40342] [--lifetime-seconds N]
//! twinroute-standins amqp [--listen 127.0.0.1:5672] [--admin-listen 127.0.0.1:5673]
//! twinroute-standins all  [--imds-listen ADDR] [--lifetime-seconds N] [--amqp-listen ADDR] [--admin-listen ADDR]
//! ```

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use twinroute_emulator::amqp::{AmqpConfig, AmqpStandIn, DEV_SAS_KEY};
use twinroute_emulator::imds::{ImdsConfig, ImdsStandIn};

/// The port Azure Arc's local IMDS (HIMDS) uses; nothing on a dev machine normally holds it.
const DEFAULT_IMDS_LISTEN: &str = "127.0.0.1:40342";
/// The AMQP port (plain TCP), as a local broker or the Service Bus emulator would use.
const DEFAULT_AMQP_LISTEN: &str = "127.0.0.1:5672";

const USAGE: &str = "\
Usage: twinroute-standins imds [--listen ADDR] [--lifetime-seconds N]
       twinroute-standins amqp [--listen ADDR] [--admin-listen ADDR]
       twinroute-standins all  [--imds-listen ADDR] [--lifetime-seconds N]
                               [--amqp-listen ADDR] [--admin-listen ADDR]

Runs local stand-ins until Ctrl-C and prints their URLs.

  imds   the Azure Instance Metadata Service managed-identity token endpoint
  amqp   Event Hubs and Service Bus over AMQP 1.0 (plain TCP; give the printed endpoint to the
         SDK as its custom endpoint and keep the real namespace host name)
  all    both, the AMQP stand-in accepting the tokens the IMDS stand-in issues

Options:
  --listen ADDR           loopback address to listen on (imds: 127.0.0.1:40342,
                          amqp: 127.0.0.1:5672; port 0 picks one)
  --imds-listen ADDR      `all`: the IMDS stand-in's address (default 127.0.0.1:40342)
  --amqp-listen ADDR      `all`: the AMQP stand-in's address (default 127.0.0.1:5672)
  --admin-listen ADDR     the AMQP stand-in's HTTP admin address (default: the AMQP port + 1)
  --lifetime-seconds N    lifetime of issued tokens (default 86400)
  -h, --help              print this help

Steer the IMDS stand-in over HTTP on its port: POST /_standin/faults, POST /_standin/reset,
GET /_standin/stats, POST /_standin/config. Steer the AMQP stand-in on its admin port:
POST /_standin/faults, GET /_standin/stats, POST /_standin/drop-connections.";

struct ImdsArgs {
    listen: SocketAddr,
    lifetime: Option<Duration>,
}

struct AmqpArgs {
    listen: SocketAddr,
    admin_listen: SocketAddr,
}

enum Command {
    Help,
    Imds(ImdsArgs),
    Amqp(AmqpArgs),
    All(ImdsArgs, AmqpArgs),
}

fn loopback(flag: &str, text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr =
        text.parse().map_err(|_| format!("{flag}: {text:?} is not an address like 127.0.0.1:40342"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{flag}: {addr} is not a loopback address; the stand-ins serve this machine only"
        ));
    }
    Ok(addr)
}

fn parse(args: &[String]) -> Result<Command, String> {
    let mut args = args.iter().map(String::as_str);
    let command = match args.next() {
        None | Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some(command @ ("imds" | "amqp" | "all")) => command,
        Some(other) => return Err(format!("unknown stand-in {other:?}; use `imds`, `amqp` or `all`")),
    };
    let mut imds_listen = None;
    let mut amqp_listen = None;
    let mut admin_listen = None;
    let mut lifetime = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (arg, None),
        };
        let mut value = || inline.or_else(|| args.next()).ok_or_else(|| format!("{flag} needs a value"));
        match (command, flag) {
            (_, "-h" | "--help") => return Ok(Command::Help),
            ("imds", "--listen") | ("all", "--imds-listen") => imds_listen = Some(loopback(flag, value()?)?),
            ("amqp", "--listen") | ("all", "--amqp-listen") => amqp_listen = Some(loopback(flag, value()?)?),
            ("amqp" | "all", "--admin-listen") => admin_listen = Some(loopback(flag, value()?)?),
            ("imds" | "all", "--lifetime-seconds") => {
                let v = value()?;
                let secs: u64 =
                    v.parse().map_err(|_| format!("--lifetime-seconds: {v:?} is not a number of seconds"))?;
                lifetime = Some(Duration::from_secs(secs));
            }
            (_, other) => return Err(format!("unknown option {other:?} for `{command}`")),
        }
    }
    let default = |text: &str| text.parse::<SocketAddr>().expect("default addresses parse");
    let imds = ImdsArgs { listen: imds_listen.unwrap_or_else(|| default(DEFAULT_IMDS_LISTEN)), lifetime };
    let listen = amqp_listen.unwrap_or_else(|| default(DEFAULT_AMQP_LISTEN));
    // Next to the AMQP port, or any port when the AMQP port is picked by the system.
    let admin_port = if listen.port() == 0 { 0 } else { listen.port().checked_add(1).unwrap_or(0) };
    let amqp =
        AmqpArgs { listen, admin_listen: admin_listen.unwrap_or(SocketAddr::new(listen.ip(), admin_port)) };
    Ok(match command {
        "imds" => Command::Imds(imds),
        "amqp" => Command::Amqp(amqp),
        _ => Command::All(imds, amqp),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (imds, amqp) = match parse(&args) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Imds(imds)) => (Some(imds), None),
        Ok(Command::Amqp(amqp)) => (None, Some(amqp)),
        Ok(Command::All(imds, amqp)) => (Some(imds), Some(amqp)),
        Err(message) => {
            eprintln!("twinroute-standins: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let imds = match imds {
        Some(args) => match start_imds(args).await {
            Ok(standin) => Some(standin),
            Err(message) => {
                eprintln!("twinroute-standins: {message}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let amqp = match amqp {
        Some(args) => match start_amqp(args).await {
            Ok(standin) => Some(standin),
            Err(message) => {
                eprintln!("twinroute-standins: {message}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    println!("Ctrl-C stops.");

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("twinroute-standins: cannot wait for Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(standin) = amqp {
        standin.shutdown().await;
    }
    if let Some(standin) = imds {
        standin.shutdown().await;
    }
    ExitCode::SUCCESS
}

async fn start_imds(args: ImdsArgs) -> Result<ImdsStandIn, String> {
    let mut config = ImdsConfig::default();
    if let Some(lifetime) = args.lifetime {
        config.token_lifetime = lifetime;
    }
    let standin = ImdsStandIn::start_on(args.listen, config)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let config = standin.config();
    println!("IMDS stand-in token URL: {}", standin.token_url());
    println!("  admin: http://{}/_standin/stats", standin.addr());
    println!("  tenant: {}", config.tenant_id);
    if let Some(system) = &config.system_assigned {
        println!("  system-assigned: client_id {} object_id {}", system.client_id, system.object_id);
    }
    for user in &config.user_assigned {
        println!(
            "  user-assigned:   client_id {} object_id {} msi_res_id {}",
            user.client_id,
            user.object_id,
            user.msi_res_id.as_deref().unwrap_or("-")
        );
    }
    println!("  tokens: HS256 with the development key, {} s lifetime", config.token_lifetime.as_secs());
    Ok(standin)
}

async fn start_amqp(args: AmqpArgs) -> Result<AmqpStandIn, String> {
    let standin = AmqpStandIn::start_on(args.listen, AmqpConfig::default())
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let admin = standin
        .serve_admin(args.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {} (admin): {e}", args.admin_listen))?;
    println!("AMQP stand-in endpoint: {} (plain TCP: the SDK's custom endpoint)", standin.endpoint());
    println!("  admin: http://{admin}/_standin/stats");
    for namespace in &standin.config().namespaces {
        println!("  namespace: {}", namespace.host);
        for hub in &namespace.hubs {
            println!("    event hub {} ({} partitions)", hub.name, hub.partition_count);
        }
        for queue in &namespace.queues {
            println!("    queue {queue}");
        }
        for topic in &namespace.topics {
            println!("    topic {} (subscriptions: {})", topic.name, topic.subscriptions.join(", "));
        }
        for (name, key) in &namespace.sas_keys {
            let note = if key == DEV_SAS_KEY { " (development only: published in the source)" } else { "" };
            println!("    SAS key {name} = {key}{note}");
        }
    }
    println!(
        "  tokens: CBS put-token, type jwt (HS256, the development key) or servicebus.windows.net:sastoken"
    );
    Ok(standin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_imds_options() {
        let Ok(Command::Imds(a)) = parse(&args(&["imds"])) else { panic!("imds") };
        assert_eq!(a.listen.to_string(), DEFAULT_IMDS_LISTEN);
        assert!(a.lifetime.is_none());
        let parsed = parse(&args(&["imds", "--listen", "127.0.0.1:0", "--lifetime-seconds=30"]));
        let Ok(Command::Imds(a)) = parsed else { panic!("imds with options") };
        assert_eq!(a.listen.port(), 0);
        assert_eq!(a.lifetime, Some(Duration::from_secs(30)));
        assert!(matches!(parse(&args(&[])), Ok(Command::Help)));
        assert!(matches!(parse(&args(&["imds", "--help"])), Ok(Command::Help)));
    }

    #[test]
    fn parses_amqp_and_all_options() {
        let Ok(Command::Amqp(a)) = parse(&args(&["amqp"])) else { panic!("amqp") };
        assert_eq!(a.listen.to_string(), DEFAULT_AMQP_LISTEN);
        assert_eq!(a.admin_listen.to_string(), "127.0.0.1:5673");
        let parsed = parse(&args(&["amqp", "--listen=127.0.0.1:0"]));
        let Ok(Command::Amqp(a)) = parsed else { panic!("amqp on port 0") };
        assert_eq!((a.listen.port(), a.admin_listen.port()), (0, 0));
        let parsed = parse(&args(&["amqp", "--listen", "127.0.0.1:7000", "--admin-listen", "127.0.0.1:9"]));
        let Ok(Command::Amqp(a)) = parsed else { panic!("amqp with admin") };
        assert_eq!((a.listen.port(), a.admin_listen.port()), (7000, 9));

        let parsed = parse(&args(&[
            "all",
            "--imds-listen",
            "127.0.0.1:1",
            "--amqp-listen",
            "127.0.0.1:2",
            "--lifetime-seconds",
            "5",
        ]));
        let Ok(Command::All(i, a)) = parsed else { panic!("all") };
        assert_eq!((i.listen.port(), a.listen.port(), a.admin_listen.port()), (1, 2, 3));
        assert_eq!(i.lifetime, Some(Duration::from_secs(5)));
        let Ok(Command::All(i, a)) = parse(&args(&["all"])) else { panic!("all defaults") };
        assert_eq!(
            (i.listen.to_string(), a.listen.to_string()),
            (DEFAULT_IMDS_LISTEN.into(), DEFAULT_AMQP_LISTEN.into())
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        for bad in [
            &["amqps"][..],
            &["amqp", "--lifetime-seconds", "5"],
            &["amqp", "--listen", "10.0.0.1:5672"],
            &["amqp", "--admin-listen", "0.0.0.0:1"],
            &["all", "--listen", "127.0.0.1:1"],
            &["imds", "--admin-listen", "127.0.0.1:1"],
            &["imds", "--listen"],
            &["imds", "--listen", "0.0.0.0:40342"],
            &["imds", "--listen", "169.254.169.254:80"], // refused by parsing: not loopback
            &["imds", "--lifetime-seconds", "soon"],
            &["imds", "--verbose"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
