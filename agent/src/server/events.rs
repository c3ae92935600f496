//! Workload events from init: one JSON object a line on the `--workload-fd` pipe,
//! `{"event":"started","pid":N}`, `{"event":"exited","pid":N,"code":C}` and, for each
//! boot mount, `{"event":"mount","spec":"SOURCE TARGET TYPE OPTIONS","device":D,"error":E}`.
//!
//! The objects are flat, so a small parser does (no JSON dependency in the guest
//! binary's agent half).

use std::collections::HashMap;
use std::io::BufRead;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::process::Workload;
use super::storage::Storages;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Num(f64),
    Other,
}

/// Parses a flat JSON object (string, number, bool and null values).
pub fn parse_flat_object(text: &str) -> Option<HashMap<String, Value>> {
    let mut p = Parser { chars: text.trim().chars().peekable() };
    let mut out = HashMap::new();
    p.expect('{')?;
    p.skip_ws();
    if p.peek() == Some('}') {
        p.next();
        return Some(out);
    }
    loop {
        p.skip_ws();
        let key = p.string()?;
        p.skip_ws();
        p.expect(':')?;
        p.skip_ws();
        let value = match p.peek()? {
            '"' => Value::Str(p.string()?),
            '-' | '0'..='9' => Value::Num(p.number()?),
            't' | 'f' | 'n' => {
                p.word()?;
                Value::Other
            }
            _ => return None,
        };
        out.insert(key, value);
        p.skip_ws();
        match p.next()? {
            ',' => continue,
            '}' => break,
            _ => return None,
        }
    }
    p.skip_ws();
    p.next().is_none().then_some(out)
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl Parser<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }
    fn next(&mut self) -> Option<char> {
        self.chars.next()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.next();
        }
    }
    fn expect(&mut self, c: char) -> Option<()> {
        (self.next()? == c).then_some(())
    }
    fn string(&mut self) -> Option<String> {
        self.expect('"')?;
        let mut s = String::new();
        loop {
            match self.next()? {
                '"' => return Some(s),
                '\\' => match self.next()? {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'r' => s.push('\r'),
                    'b' => s.push('\u{8}'),
                    'f' => s.push('\u{c}'),
                    'u' => {
                        let hex: String = (0..4).filter_map(|_| self.next()).collect();
                        s.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('\u{fffd}'));
                    }
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
    }
    fn number(&mut self) -> Option<f64> {
        let mut s = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() || "+-.eE".contains(c) {
                s.push(c);
                self.next();
            } else {
                break;
            }
        }
        s.parse().ok()
    }
    fn word(&mut self) -> Option<()> {
        let mut s = String::new();
        while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
            s.push(self.next()?);
        }
        matches!(s.as_str(), "true" | "false" | "null").then_some(())
    }
}

/// An event init reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Started {
        pid: i32,
    },
    Exited {
        pid: i32,
        code: i32,
    },
    /// A boot mount: its spec as an fstab line, the device used, and the error ("" when
    /// it is mounted).
    Mount {
        spec: String,
        device: String,
        error: String,
    },
}

pub fn parse_event(line: &str) -> Option<Event> {
    let obj = parse_flat_object(line)?;
    let int = |key: &str| match obj.get(key) {
        Some(Value::Num(n)) if n.fract() == 0.0 && *n >= f64::from(i32::MIN) && *n <= f64::from(i32::MAX) => Some(*n as i32),
        _ => None,
    };
    match obj.get("event") {
        Some(Value::Str(e)) if e == "started" => Some(Event::Started { pid: int("pid")? }),
        Some(Value::Str(e)) if e == "exited" => Some(Event::Exited { pid: int("pid")?, code: int("code")? }),
        Some(Value::Str(e)) if e == "mount" => {
            let string = |key: &str| match obj.get(key) {
                Some(Value::Str(s)) => Some(s.clone()),
                None => Some(String::new()),
                _ => None,
            };
            Some(Event::Mount { spec: string("spec").filter(|s| !s.is_empty())?, device: string("device")?, error: string("error")? })
        }
        _ => None,
    }
}

/// Reads events from `fd` until it closes, feeding `workload`.
pub fn spawn_reader(fd: OwnedFd, workload: Arc<Workload>, storages: Arc<Storages>) -> std::io::Result<()> {
    std::thread::Builder::new().name("osb-events".into()).stack_size(64 * 1024).spawn(move || {
        let reader = std::io::BufReader::new(std::fs::File::from(fd));
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            if line.trim().is_empty() {
                continue;
            }
            match parse_event(&line) {
                Some(Event::Started { pid }) => workload.started(pid),
                Some(Event::Exited { pid, code }) => workload.exited(pid, code),
                Some(Event::Mount { spec, device, error }) => storages.boot_mount(&spec, &device, &error),
                None => eprintln!("osb-agent: ignoring workload event {:?}", line.trim()),
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events() {
        for (line, event) in [
            (r#"{"event":"started","pid":123}"#, Some(Event::Started { pid: 123 })),
            (r#" { "pid" : 7, "event" : "exited", "code" : 137 } "#, Some(Event::Exited { pid: 7, code: 137 })),
            (r#"{"event":"exited","pid":7}"#, None),
            (r#"{"event":"paused","pid":7}"#, None),
            (r#"{"event":"started","pid":1.5}"#, None),
            (r#"{"event":"started","pid":1,"extra":[1]}"#, None),
            (r#"{"event":"started","pid":1,"x":null,"y":true,"z":"a\"b\u0041"}"#, Some(Event::Started { pid: 1 })),
            ("not json", None),
            (
                r#"{"event":"mount","spec":"LABEL=d /d ext4 rw","device":"/dev/vdb"}"#,
                Some(Event::Mount { spec: "LABEL=d /d ext4 rw".into(), device: "/dev/vdb".into(), error: String::new() }),
            ),
            (r#"{"event":"mount","device":"/dev/vdb"}"#, None),
            (r#"{"event":"mount","spec":"a /b","error":1}"#, None),
            (r#"{"event":"started","pid":1} trailing"#, None),
        ] {
            assert_eq!(parse_event(line), event, "{line}");
        }
    }
}
