//! `harbor ctl`: the admin API for people at a shell. Each command is one HTTP request to the
//! running Harbor; the answer is printed as a table, or as the API's JSON with `--json`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{CtlArgs, CtlCommand};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: u64 = 16 << 20;

pub fn run(args: CtlArgs) -> ExitCode {
    let token = match &args.admin_token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim().to_string()),
            Err(e) => {
                eprintln!("harbor ctl: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let encode = |address: &str| address.replace('[', "%5B").replace(']', "%5D");
    let (method, path, body) = match &args.command {
        CtlCommand::Services => ("GET", "/services".to_string(), None),
        CtlCommand::Backends { service: Some(s) } => ("GET", format!("/services/{s}/backends"), None),
        CtlCommand::Backends { service: None } => ("GET", "/services".to_string(), None),
        CtlCommand::Add { service, address, weight } => {
            ("POST", format!("/services/{service}/backends"), Some(json!({ "address": address, "weight": weight })))
        }
        CtlCommand::Weight { service, address, weight } => {
            ("PATCH", format!("/services/{service}/backends/{}", encode(address)), Some(json!({ "weight": weight })))
        }
        CtlCommand::Drain { service, address } => {
            ("PATCH", format!("/services/{service}/backends/{}", encode(address)), Some(json!({ "state": "draining" })))
        }
        CtlCommand::Ready { service, address } => {
            ("PATCH", format!("/services/{service}/backends/{}", encode(address)), Some(json!({ "state": "ready" })))
        }
        CtlCommand::Remove { service, address } => {
            ("DELETE", format!("/services/{service}/backends/{}", encode(address)), None)
        }
    };
    let answer = match request(&args.admin, method, &path, body.as_ref(), token.as_deref()) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("harbor ctl: {}: {e}", args.admin);
            return ExitCode::FAILURE;
        }
    };
    let (status, value) = answer;
    if !(200..300).contains(&status) {
        let message = value.get("error").and_then(Value::as_str).unwrap_or("request refused");
        let field = value.get("field").and_then(Value::as_str).map(|f| format!(" ({f})")).unwrap_or_default();
        eprintln!("harbor ctl: {status}: {message}{field}");
        return ExitCode::FAILURE;
    }
    // `backends` with no service: every service's.
    if let CtlCommand::Backends { service: None } = &args.command {
        let names: Vec<String> = value
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.get("name").and_then(Value::as_str).map(String::from)).collect())
            .unwrap_or_default();
        let mut all = Vec::new();
        for name in names {
            match request(&args.admin, "GET", &format!("/services/{name}/backends"), None, token.as_deref()) {
                Ok((_, Value::Array(backends))) => all.extend(backends.into_iter().map(|mut b| {
                    if let Value::Object(map) = &mut b {
                        map.insert("service".into(), Value::String(name.clone()));
                    }
                    b
                })),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("harbor ctl: {}: {e}", args.admin);
                    return ExitCode::FAILURE;
                }
            }
        }
        print_value(
            &Value::Array(all),
            args.json,
            &["service", "address", "weight", "source", "state", "health", "active"],
        );
        return ExitCode::SUCCESS;
    }
    let columns: &[&str] = match &args.command {
        CtlCommand::Services => &["name", "listen", "backends", "eligible", "active_connections", "strategy"],
        CtlCommand::Backends { .. } => &["address", "weight", "source", "state", "health", "active", "picks"],
        _ => &[],
    };
    print_value(&value, args.json, columns);
    ExitCode::SUCCESS
}

/// One HTTP/1.1 request; returns the status and the JSON answer.
fn request(
    admin: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Result<(u16, Value), String> {
    let addr = admin
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "the admin address resolves to nothing".to_string())?;
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: harbor\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body.as_bytes())).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.get(9..12).and_then(|s| s.parse::<u16>().ok()).ok_or("not an HTTP answer")?;
    let payload = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let value = serde_json::from_str(payload).unwrap_or(Value::String(payload.trim().to_string()));
    Ok((status, value))
}

fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items.iter().map(|i| cell(Some(i))).collect::<Vec<_>>().join(","),
        Some(other) => other.to_string(),
    }
}

/// Prints rows as an aligned table (or the JSON).
fn print_value(value: &Value, as_json: bool, columns: &[&str]) {
    if as_json || columns.is_empty() {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        return;
    }
    let rows: Vec<Vec<String>> = match value {
        Value::Array(items) => items.iter().map(|item| columns.iter().map(|c| cell(item.get(c))).collect()).collect(),
        other => vec![columns.iter().map(|c| cell(other.get(c))).collect()],
    };
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |cells: Vec<String>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    println!("{}", line(columns.iter().map(|c| c.to_uppercase()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}
