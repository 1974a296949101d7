//! `twinroute-standins`: runs a local stand-in until Ctrl-C.
//!
//! ```text
//! twinroute-standins imds [--listen 127.0.0.1:40342] [--lifetime-seconds N]
//! ```

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use twinroute_emulator::imds::{ImdsConfig, ImdsStandIn};

/// The port Azure Arc's local IMDS (HIMDS) uses; nothing on a dev machine normally holds it.
const DEFAULT_IMDS_LISTEN: &str = "127.0.0.1:40342";

const USAGE: &str = "\
Usage: twinroute-standins imds [--listen ADDR] [--lifetime-seconds N]

Runs a local stand-in for the Azure Instance Metadata Service managed-identity token endpoint
until Ctrl-C, and prints its token URL.

Options:
  --listen ADDR           loopback address to listen on (default 127.0.0.1:40342; port 0 picks one)
  --lifetime-seconds N    lifetime of issued tokens (default 86400)
  -h, --help              print this help

Steer it over HTTP on the same port: POST /_standin/faults, POST /_standin/reset,
GET /_standin/stats, POST /_standin/config.";

struct ImdsArgs {
    listen: SocketAddr,
    lifetime: Option<Duration>,
}

enum Command {
    Help,
    Imds(ImdsArgs),
}

fn parse(args: &[String]) -> Result<Command, String> {
    let mut args = args.iter().map(String::as_str);
    match args.next() {
        None | Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("imds") => {}
        Some(other) => return Err(format!("unknown stand-in {other:?}; the only one so far is `imds`")),
    }
    let mut listen = DEFAULT_IMDS_LISTEN.to_owned();
    let mut lifetime = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (arg, None),
        };
        let mut value = || inline.or_else(|| args.next()).ok_or_else(|| format!("{flag} needs a value"));
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--listen" => listen = value()?.to_owned(),
            "--lifetime-seconds" => {
                let v = value()?;
                let secs: u64 =
                    v.parse().map_err(|_| format!("--lifetime-seconds: {v:?} is not a number of seconds"))?;
                lifetime = Some(Duration::from_secs(secs));
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let listen: SocketAddr =
        listen.parse().map_err(|_| format!("--listen: {listen:?} is not an address like 127.0.0.1:40342"))?;
    if !listen.ip().is_loopback() {
        return Err(format!(
            "--listen: {listen} is not a loopback address; the stand-ins serve this machine only"
        ));
    }
    Ok(Command::Imds(ImdsArgs { listen, lifetime }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let imds = match parse(&args) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Imds(imds)) => imds,
        Err(message) => {
            eprintln!("twinroute-standins: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut config = ImdsConfig::default();
    if let Some(lifetime) = imds.lifetime {
        config.token_lifetime = lifetime;
    }
    let standin = match ImdsStandIn::start_on(imds.listen, config).await {
        Ok(standin) => standin,
        Err(e) => {
            eprintln!("twinroute-standins: cannot listen on {}: {e}", imds.listen);
            return ExitCode::FAILURE;
        }
    };
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
    println!(
        "  tokens: HS256 with the development key, {} s lifetime; Ctrl-C stops",
        config.token_lifetime.as_secs()
    );

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("twinroute-standins: cannot wait for Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    standin.shutdown().await;
    ExitCode::SUCCESS
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
    fn rejects_bad_arguments() {
        for bad in [
            &["amqp"][..],
            &["imds", "--listen"],
            &["imds", "--listen", "0.0.0.0:40342"],
            &["imds", "--listen", "169.254.169.254:80"],
            &["imds", "--lifetime-seconds", "soon"],
            &["imds", "--verbose"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
