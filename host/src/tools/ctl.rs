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
        CtlCommand::Maint { service, address } => {
            ("PATCH", format!("/services/{service}/backends/{}", encode(address)), Some(json!({ "state": "maint" })))
        }
        CtlCommand::Ready { service, address } => {
            ("PATCH", format!("/services/{service}/backends/{}", encode(address)), Some(json!({ "state": "ready" })))
        }
        CtlCommand::Remove { service, address } => {
            ("DELETE", format!("/services/{service}/backends/{}", encode(address)), None)
        }
        CtlCommand::Sessions { service: Some(s) } => ("GET", format!("/services/{s}/sessions"), None),
        CtlCommand::Sessions { service: None } => ("GET", "/services".to_string(), None),
        CtlCommand::KillSession { service, id } => ("DELETE", format!("/services/{service}/sessions/{id}"), None),
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
    // `backends` and `sessions` with no service: every service's, in one table.
    let every_service = match &args.command {
        CtlCommand::Backends { service: None } => Some((
            "backends",
            &["service", "name", "address", "weight", "state", "health", "active", "queued", "last_check"][..],
        )),
        CtlCommand::Sessions { service: None } => Some((
            "sessions",
            &["service", "id", "client", "backend_name", "age_ms", "bytes_to_backend", "bytes_to_client", "state"][..],
        )),
        _ => None,
    };
    if let Some((what, columns)) = every_service {
        let names: Vec<String> = value
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.get("name").and_then(Value::as_str).map(String::from)).collect())
            .unwrap_or_default();
        let mut all = Vec::new();
        for name in names {
            match request(&args.admin, "GET", &format!("/services/{name}/{what}"), None, token.as_deref()) {
                Ok((_, answer)) => all.extend(rows_of(answer, what).into_iter().map(|mut row| {
                    if let Value::Object(map) = &mut row {
                        map.insert("service".into(), Value::String(name.clone()));
                    }
                    row
                })),
                Err(e) => {
                    eprintln!("harbor ctl: {}: {e}", args.admin);
                    return ExitCode::FAILURE;
                }
            }
        }
        print_value(&Value::Array(all), args.json, columns);
        return ExitCode::SUCCESS;
    }
    let columns: &[&str] = match &args.command {
        CtlCommand::Services => &["name", "mode", "listen", "backends", "eligible", "active_connections", "strategy"],
        CtlCommand::Sessions { .. } => {
            print_value(&Value::Array(rows_of(value, "sessions")), args.json, SESSION_COLUMNS);
            return ExitCode::SUCCESS;
        }
        CtlCommand::Backends { .. } => &[
            "name",
            "address",
            "weight",
            "source",
            "state",
            "health",
            "active",
            "queued",
            "picks",
            "http",
            "last_check",
        ],
        _ => &[],
    };
    print_value(&value, args.json, columns);
    ExitCode::SUCCESS
}

const SESSION_COLUMNS: &[&str] =
    &["id", "client", "backend_name", "age_ms", "bytes_to_backend", "bytes_to_client", "state"];

/// The rows of a list answer: `/backends` is an array, `/sessions` an object holding one.
fn rows_of(answer: Value, what: &str) -> Vec<Value> {
    match answer {
        Value::Array(rows) => rows,
        Value::Object(mut fields) => match fields.remove(what) {
            Some(Value::Array(rows)) => rows,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// One HTTP/1.1 request; returns the status and the JSON answer.
fn request(
    admin: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> Result<(u16, Value), String> {
    let (status, payload) = request_raw(admin, method, path, body, token, MAX_ANSWER)?;
    let payload = String::from_utf8_lossy(&payload);
    let value = serde_json::from_str(&payload).unwrap_or(Value::String(payload.trim().to_string()));
    Ok((status, value))
}

/// One HTTP/1.1 request; returns the status and at most `max` bytes of the body.
fn request_raw(
    admin: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
    max: u64,
) -> Result<(u16, Vec<u8>), String> {
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
    stream.take(max.saturating_add(64 << 10)).read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("not an HTTP answer")?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |at| at + 4);
    Ok((status, answer.split_off(split)))
}

/// How `harbor strategy record` was asked to record.
pub struct RecordArgs {
    pub admin: String,
    pub admin_token_file: Option<std::path::PathBuf>,
    pub service: String,
    pub picks: usize,
    pub wait: Duration,
    pub out: std::path::PathBuf,
}

/// `harbor strategy record`: starts a recording in the running Harbor, waits until it holds
/// `picks` picks (or `wait` has passed), writes the trace to `out` and ends the recording.
pub fn record(args: RecordArgs) -> ExitCode {
    let token = match &args.admin_token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim().to_string()),
            Err(e) => {
                eprintln!("harbor strategy record: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let fail = |what: String| {
        eprintln!("harbor strategy record: {}: {what}", args.admin);
        ExitCode::FAILURE
    };
    let path = format!("/services/{}/record", args.service);
    let refused = |status: u16, value: &Value| {
        let message = value.get("error").and_then(Value::as_str).unwrap_or("request refused");
        format!("{status}: {message}")
    };
    match request(&args.admin, "POST", &path, Some(&json!({ "picks": args.picks })), token.as_deref()) {
        Ok((200, _)) => {}
        Ok((status, value)) => return fail(refused(status, &value)),
        Err(e) => return fail(e),
    }
    eprintln!("recording up to {} picks of service {} (at most {:?})", args.picks, args.service, args.wait);
    let deadline = tokio::time::Instant::now() + args.wait;
    let picks = loop {
        let picks = match request(&args.admin, "GET", &path, None, token.as_deref()) {
            Ok((200, value)) => {
                let picks = value.get("picks").and_then(Value::as_u64).unwrap_or(0);
                if value.get("complete").and_then(Value::as_bool) == Some(true) {
                    break picks;
                }
                picks
            }
            Ok((status, value)) => return fail(refused(status, &value)),
            Err(e) => return fail(e),
        };
        if tokio::time::Instant::now() >= deadline {
            eprintln!("waited {:?}: writing the {picks} picks recorded so far", args.wait);
            break picks;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let max = harbor::strategy::MAX_TRACE_BYTES as u64;
    let trace = match request_raw(&args.admin, "GET", &format!("{path}/trace"), None, token.as_deref(), max) {
        Ok((200, trace)) => trace,
        Ok((status, body)) => return fail(format!("{status}: {}", String::from_utf8_lossy(&body).trim())),
        Err(e) => return fail(e),
    };
    // The recording is done with; ending it costs the data plane nothing any more.
    let _ = request(&args.admin, "DELETE", &path, None, token.as_deref());
    if let Err(e) = std::fs::write(&args.out, &trace) {
        eprintln!("harbor strategy record: cannot write {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("recorded {picks} picks ({} bytes) to {}", trace.len(), args.out.display());
    ExitCode::SUCCESS
}

fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items.iter().map(|i| cell(Some(i))).collect::<Vec<_>>().join(","),
        // A health check's result: what it saw, and how long it took.
        Some(Value::Object(check)) if check.contains_key("detail") => {
            let took = check.get("took_micros").and_then(Value::as_u64).unwrap_or(0);
            format!("{} ({:.1} ms)", cell(check.get("detail")), took as f64 / 1000.0)
        }
        // HTTP mode: the backend's answers by class, and its time to first byte.
        Some(Value::Object(http)) if http.contains_key("responses") => {
            let classes: Vec<u64> = http
                .get("responses")
                .and_then(Value::as_array)
                .map(|r| r.iter().map(|n| n.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default();
            let of = |i: usize| classes.get(i).copied().unwrap_or(0);
            let micros = http.get("first_byte_micros").and_then(Value::as_u64).unwrap_or(0);
            format!("2xx={} 4xx={} 5xx={} ttfb={:.1}ms", of(1), of(3), of(4), micros as f64 / 1000.0)
        }
        Some(other) => other.to_string(),
    }
}

/// Prints rows as an aligned table (or the JSON).
fn print_value(value: &Value, as_json: bool, columns: &[&str]) {
    if as_json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        return;
    }
    if columns.is_empty() {
        // An answer to a change: one `KEY  value` line per field.
        if let Value::Object(fields) = value {
            let width = fields.keys().map(String::len).max().unwrap_or(0);
            for (key, field) in fields {
                println!("{:<width$}  {}", key.to_uppercase(), cell(Some(field)));
            }
        } else {
            println!("{}", cell(Some(value)));
        }
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
