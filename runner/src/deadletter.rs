//! The dead-letter file: one JSON line per message that could not be
//! mapped, with its position, the reason and the raw bytes. Written and
//! synced before the batch that skips the message commits, so a committed
//! position never hides a lost message. A crash between the two can repeat a
//! dead letter (at-least-once); its position tells the copies apart.

use base64::Engine;
use idem_core::{Message, PartitionRef};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A message that goes to the dead letters.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub offset: u64,
    pub reason: String,
    pub raw: Option<Vec<u8>>,
}

impl DeadLetter {
    pub fn new(msg: &Message, reason: String) -> Self {
        DeadLetter {
            offset: msg.offset,
            reason,
            raw: msg.value.clone(),
        }
    }
}

impl idem_core::Rejects for DeadLetterFile {
    fn reject(
        &self,
        partition: &PartitionRef,
        offset: u64,
        reason: String,
        raw: Vec<u8>,
    ) -> std::io::Result<()> {
        self.write(
            partition,
            &[DeadLetter {
                offset,
                reason,
                raw: Some(raw),
            }],
        )
    }
}

#[derive(Serialize)]
struct Line<'a> {
    connector: &'a str,
    source: &'a str,
    partition: &'a str,
    offset: u64,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_base64: Option<String>,
    at: String,
}

/// Appends dead letters to one file.
pub struct DeadLetterFile {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl DeadLetterFile {
    /// The file is created on the first dead letter, not before.
    pub fn new(path: PathBuf) -> Self {
        DeadLetterFile {
            path,
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append and fsync `letters` of `partition`.
    pub fn write(&self, partition: &PartitionRef, letters: &[DeadLetter]) -> std::io::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut buf = Vec::new();
        for dl in letters {
            let text = dl.raw.as_deref().map(std::str::from_utf8);
            let line = Line {
                connector: &partition.connector,
                source: &partition.source,
                partition: &partition.partition,
                offset: dl.offset,
                reason: &dl.reason,
                raw: text.and_then(Result::ok),
                raw_base64: match (&dl.raw, text) {
                    (Some(bytes), Some(Err(_))) => {
                        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                    _ => None,
                },
                at: at.clone(),
            };
            serde_json::to_writer(&mut buf, &line)?;
            buf.push(b'\n');
        }
        let mut guard = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("dead-letter lock poisoned"))?;
        if guard.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            *guard = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let file = guard
            .as_mut()
            .ok_or_else(|| std::io::Error::other("dead-letter file not open"))?;
        file.write_all(&buf)?;
        file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_position_reason_and_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = DeadLetterFile::new(dir.path().join("sub/dl.jsonl"));
        let p = PartitionRef::new("c", "file", "/x.jsonl");
        f.write(
            &p,
            &[
                DeadLetter {
                    offset: 10,
                    reason: "bad".into(),
                    raw: Some(b"{oops".to_vec()),
                },
                DeadLetter {
                    offset: 20,
                    reason: "utf8".into(),
                    raw: Some(vec![0xff, 0x00]),
                },
            ],
        )
        .unwrap();
        let text = std::fs::read_to_string(f.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["offset"], 10);
        assert_eq!(lines[0]["partition"], "/x.jsonl");
        assert_eq!(lines[0]["reason"], "bad");
        assert_eq!(lines[0]["raw"], "{oops");
        assert_eq!(lines[1]["raw_base64"], "/wA=");
        assert!(lines[1].get("raw").is_none());
    }
}
