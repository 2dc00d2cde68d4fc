use crate::FileSourceConfig;
use async_trait::async_trait;
use idem_core::{Assignment, Message, PartitionReader, ReadStatus, Source, SourceError};
use std::collections::BTreeSet;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

const NAME: &str = "file";

/// Reads the files matched by a [`FileSourceConfig`].
pub struct FileSource {
    config: FileSourceConfig,
    /// Files already assigned; in batch mode, `Some` once the single
    /// assignment went out.
    assigned: Mutex<Option<BTreeSet<String>>>,
}

impl FileSource {
    pub fn new(config: FileSourceConfig) -> Self {
        FileSource {
            config,
            assigned: Mutex::new(None),
        }
    }

    fn setup_error(&self, message: String) -> SourceError {
        SourceError::Setup {
            source_name: NAME.into(),
            message,
        }
    }

    /// The files the pattern matches now, as absolute paths.
    fn scan(&self) -> Result<BTreeSet<String>, SourceError> {
        let paths = glob::glob(&self.config.path)
            .map_err(|e| self.setup_error(format!("path `{}`: {e}", self.config.path)))?;
        let mut files = BTreeSet::new();
        for entry in paths {
            let path = entry.map_err(|e| self.setup_error(e.to_string()))?;
            if path.is_file() {
                let abs = std::fs::canonicalize(&path).map_err(|e| {
                    self.setup_error(format!("cannot resolve {}: {e}", path.display()))
                })?;
                files.insert(abs.to_string_lossy().into_owned());
            }
        }
        Ok(files)
    }
}

#[async_trait]
impl Source for FileSource {
    fn name(&self) -> &str {
        NAME
    }

    async fn next_assignment(&self) -> Result<Option<Assignment>, SourceError> {
        loop {
            let known = self
                .assigned
                .lock()
                .map_err(|_| self.setup_error("assignment state poisoned".into()))?
                .clone();
            if known.is_some() && !self.config.follow {
                return Ok(None);
            }
            let files = self.scan()?;
            if files.is_empty() && !self.config.follow {
                return Err(self.setup_error(format!(
                    "no file matches `{}` (relative paths start from the working directory)",
                    self.config.path
                )));
            }
            let known = known.unwrap_or_default();
            let new: Vec<String> = files.difference(&known).cloned().collect();
            if !new.is_empty() || !self.config.follow {
                let mut guard = self
                    .assigned
                    .lock()
                    .map_err(|_| self.setup_error("assignment state poisoned".into()))?;
                guard
                    .get_or_insert_with(BTreeSet::new)
                    .extend(new.iter().cloned());
                return Ok(Some(Assignment::Assigned(new)));
            }
            tokio::time::sleep(
                self.config
                    .poll_interval
                    .max(std::time::Duration::from_secs(1)),
            )
            .await;
        }
    }

    async fn end_offset(&self, partition: &str) -> Option<u64> {
        // Byte offsets: the file's length is the end.
        tokio::fs::metadata(partition).await.ok().map(|m| m.len())
    }

    async fn open(
        &self,
        partition: &str,
        start: Option<u64>,
    ) -> Result<Box<dyn PartitionReader>, SourceError> {
        self.open_reader(partition, start, self.config.follow).await
    }

    /// An audit reads to the end as it is now, followed or not: waiting for
    /// lines past the committed position would never end.
    async fn open_audit(&self, partition: &str) -> Result<Box<dyn PartitionReader>, SourceError> {
        self.open_reader(partition, None, false).await
    }
}

impl FileSource {
    async fn open_reader(
        &self,
        partition: &str,
        start: Option<u64>,
        follow: bool,
    ) -> Result<Box<dyn PartitionReader>, SourceError> {
        let path = PathBuf::from(partition);
        let err = |message: String, retriable: bool| SourceError::Read {
            source_name: NAME.into(),
            partition: partition.into(),
            message,
            retriable,
        };
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| err(format!("cannot open: {e}"), false))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| err(format!("cannot stat: {e}"), true))?
            .len();
        let start = start.unwrap_or(0);
        if start > len {
            return Err(err(
                format!(
                    "the sink's committed position {start} is past the end of the file ({len} bytes): \
                     was the file truncated or replaced? Idem will not guess where to resume"
                ),
                false,
            ));
        }
        let identity = file
            .metadata()
            .await
            .map(|m| FileId::of(&m))
            .map_err(|e| err(format!("cannot stat: {e}"), true))?;
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| err(format!("cannot seek to {start}: {e}"), true))?;
        Ok(Box::new(FileReader {
            partition: partition.into(),
            reader: BufReader::with_capacity(256 * 1024, file),
            identity,
            offset: start,
            line: Vec::new(),
            line_len: 0,
            follow,
            poll_interval: self.config.poll_interval,
            max_line_bytes: self.config.max_line_bytes,
        }))
    }
}

/// Which file a path names: a file replaced under the same name (a
/// rotation by rename, or a new file written over it) has another one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

struct FileReader {
    partition: String,
    reader: BufReader<tokio::fs::File>,
    /// The file opened; followed, the path must keep naming it.
    identity: FileId,
    /// Offset of the first byte of the line being read.
    offset: u64,
    /// The line being read, at most `max_line_bytes + 2` bytes of it (a
    /// longer line is dead-lettered, so the rest need not be held); kept
    /// across calls so a cancelled or partial read loses nothing.
    line: Vec<u8>,
    /// Bytes of the line on disk so far, newline included.
    line_len: u64,
    follow: bool,
    poll_interval: std::time::Duration,
    max_line_bytes: usize,
}

impl FileReader {
    fn error(&self, message: String, retriable: bool) -> SourceError {
        SourceError::Read {
            source_name: NAME.into(),
            partition: self.partition.clone(),
            message,
            retriable,
        }
    }

    /// Turn the complete line in `self.line` into a message, or skip it
    /// when blank.
    fn take_line(&mut self, out: &mut Vec<Message>) {
        let offset = self.offset;
        let on_disk = std::mem::take(&mut self.line_len);
        self.offset += on_disk;
        let whole = self.line.len() as u64 == on_disk;
        let mut line = std::mem::take(&mut self.line);
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if whole && line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let poison = (!whole || line.len() > self.max_line_bytes).then(|| {
            let reason = format!(
                "line of {} bytes exceeds max_line_bytes = {}",
                if whole { line.len() as u64 } else { on_disk },
                self.max_line_bytes
            );
            line.truncate(self.max_line_bytes);
            reason
        });
        out.push(Message {
            offset,
            next_offset: self.offset,
            key: None,
            value: Some(line),
            poison,
            meta: Default::default(),
        });
    }

    /// Following, at the end of the file: refuse a file that shrank below
    /// what was read, or a path that now names another file. Either way
    /// the lines past the position are not those the position counted.
    /// A deleted file is fine (nothing more will come to it).
    async fn check_still_the_same(&self) -> Result<(), SourceError> {
        let read_to = self.offset + self.line_len;
        let opened = self
            .reader
            .get_ref()
            .metadata()
            .await
            .map_err(|e| self.error(format!("cannot stat: {e}"), true))?;
        if opened.len() < read_to {
            return Err(self.error(
                format!(
                    "the file was truncated to {} bytes while being followed, below the {read_to} bytes read (committed up to {}): \
                     lines appended now would be read from the wrong place. Idem does not follow truncation \
                     (copytruncate rotation); write new data to new files instead",
                    opened.len(),
                    self.offset
                ),
                false,
            ));
        }
        match tokio::fs::metadata(&self.partition).await {
            Ok(now) if FileId::of(&now) != self.identity => Err(self.error(
                format!(
                    "another file now has this name (renamed, or written over) while it was followed, after {read_to} bytes of the old one: \
                     Idem does not follow rotation by rename; write new data to new files (e.g. dated names) and delete old ones once committed"
                ),
                false,
            )),
            _ => Ok(()),
        }
    }
}

/// Add `bytes` to the line being read: counted whole, kept up to what a
/// dead letter of an over-long line needs.
fn keep(line: &mut Vec<u8>, line_len: &mut u64, max_line_bytes: usize, bytes: &[u8]) {
    *line_len += bytes.len() as u64;
    let room = (max_line_bytes + 2).saturating_sub(line.len());
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

#[async_trait]
impl PartitionReader for FileReader {
    async fn read(
        &mut self,
        max: usize,
        out: &mut Vec<Message>,
    ) -> Result<ReadStatus, SourceError> {
        let before = out.len();
        while out.len() - before < max {
            let buf = match self.reader.fill_buf().await {
                Ok(buf) => buf,
                Err(e) => {
                    let at = self.offset + self.line_len;
                    return Err(self.error(format!("read failed at byte {at}: {e}"), true));
                }
            };
            if buf.is_empty() {
                // End of the file as it is now.
                if out.len() > before {
                    return Ok(ReadStatus::Data);
                }
                if self.follow {
                    self.check_still_the_same().await?;
                    // A partial last line waits for its newline.
                    tokio::time::sleep(self.poll_interval).await;
                    return Ok(ReadStatus::Idle);
                }
                if self.line_len > 0 {
                    self.take_line(out);
                    if out.len() > before {
                        return Ok(ReadStatus::Data);
                    }
                }
                return Ok(ReadStatus::End);
            }
            let (used, complete) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            keep(
                &mut self.line,
                &mut self.line_len,
                self.max_line_bytes,
                &buf[..used],
            );
            self.reader.consume(used);
            if complete {
                self.take_line(out);
            }
        }
        Ok(ReadStatus::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config(path: &str, follow: bool) -> FileSourceConfig {
        FileSourceConfig {
            path: path.into(),
            follow,
            poll_interval: std::time::Duration::from_millis(10),
            max_line_bytes: 20,
        }
    }

    async fn read_all(r: &mut Box<dyn PartitionReader>) -> Vec<Message> {
        let mut out = Vec::new();
        while r.read(2, &mut out).await.unwrap() == ReadStatus::Data {}
        out
    }

    #[tokio::test]
    async fn offsets_are_byte_offsets_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}").unwrap();
        let src = FileSource::new(config(p.to_str().unwrap(), false));
        let Some(Assignment::Assigned(parts)) = src.next_assignment().await.unwrap() else {
            panic!("expected an assignment")
        };
        assert_eq!(parts.len(), 1);
        assert!(src.next_assignment().await.unwrap().is_none());
        let mut r = src.open(&parts[0], None).await.unwrap();
        let msgs = read_all(&mut r).await;
        let offs: Vec<_> = msgs.iter().map(|m| (m.offset, m.next_offset)).collect();
        assert_eq!(offs, [(0, 8), (9, 18), (18, 25)]);
        assert_eq!(msgs[1].value.as_deref(), Some(&b"{\"a\":2}"[..]));
        // Resuming from a committed next_offset yields exactly the rest.
        let mut r = src.open(&parts[0], Some(9)).await.unwrap();
        let rest = read_all(&mut r).await;
        assert_eq!(rest, msgs[1..]);
        // A position past the end is refused, not guessed.
        assert!(src.open(&parts[0], Some(1000)).await.is_err());
    }

    #[tokio::test]
    async fn long_lines_are_poison_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, format!("{{\"a\":\"{}\"}}\n{{}}\n", "x".repeat(40))).unwrap();
        let src = FileSource::new(config(p.to_str().unwrap(), false));
        let mut r = src.open(p.to_str().unwrap(), None).await.unwrap();
        let msgs = read_all(&mut r).await;
        assert_eq!(msgs.len(), 2);
        assert!(msgs[0]
            .poison
            .as_deref()
            .unwrap()
            .contains("max_line_bytes"));
        assert!(msgs[1].poison.is_none());
    }

    #[tokio::test]
    async fn follow_waits_for_complete_lines_and_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"{\"a\":1}\n{\"a\"").unwrap();
        let pattern = dir.path().join("*.jsonl");
        let src = FileSource::new(config(pattern.to_str().unwrap(), true));
        let mut r = src.open(p.to_str().unwrap(), None).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out.len(), 1);
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        f.write_all(b":2}\n").unwrap();
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(out[1].value.as_deref(), Some(&b"{\"a\":2}"[..]));
        assert_eq!(out[1].offset, 8);

        let first = src.next_assignment().await.unwrap();
        assert!(matches!(first, Some(Assignment::Assigned(v)) if v.len() == 1));
        std::fs::write(dir.path().join("b.jsonl"), "{}\n").unwrap();
        let second = src.next_assignment().await.unwrap();
        assert!(
            matches!(second, Some(Assignment::Assigned(v)) if v.len() == 1 && v[0].ends_with("b.jsonl"))
        );
    }

    #[tokio::test]
    async fn a_huge_line_is_counted_whole_but_held_only_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        // Longer than the reader's 256 KiB buffer: read in many pieces.
        let huge = format!("{{\"a\":\"{}\"}}\n{{}}\n", "x".repeat(1 << 20));
        std::fs::write(&p, &huge).unwrap();
        let src = FileSource::new(config(p.to_str().unwrap(), false));
        let mut r = src.open(p.to_str().unwrap(), None).await.unwrap();
        let mut out = Vec::new();
        while out.len() < 2 && r.read(1, &mut out).await.unwrap() == ReadStatus::Data {}
        assert_eq!(out.len(), 2);
        let first_len = (huge.len() - 3) as u64;
        assert_eq!((out[0].offset, out[0].next_offset), (0, first_len));
        assert_eq!(out[1].offset, first_len);
        assert_eq!(out[0].value.as_ref().unwrap().len(), 20);
        let reason = out[0].poison.as_deref().unwrap();
        assert!(
            reason.contains(&format!("line of {first_len} bytes")),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn following_a_truncated_or_replaced_file_stops_with_the_positions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n").unwrap();
        let pattern = dir.path().join("*.jsonl");
        let src = FileSource::new(config(pattern.to_str().unwrap(), true));
        let mut r = src.open(p.to_str().unwrap(), None).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
        // Truncated in place (copytruncate), then written again.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        let err = r.read(10, &mut out).await.unwrap_err();
        assert!(!err.is_retriable());
        let msg = err.to_string();
        assert!(
            msg.contains("truncated to 0 bytes") && msg.contains("16 bytes read"),
            "{msg}"
        );

        // Renamed away and a new file under the old name.
        std::fs::write(&p, "{\"a\":1}\n").unwrap();
        let mut r = src.open(p.to_str().unwrap(), None).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        std::fs::rename(&p, dir.path().join("a.jsonl.1")).unwrap();
        std::fs::write(&p, "{\"b\":1}\n{\"b\":2}\n").unwrap();
        let msg = r.read(10, &mut out).await.unwrap_err().to_string();
        assert!(msg.contains("another file now has this name"), "{msg}");

        // Deleted once read: nothing more comes, and that is no error.
        let q = dir.path().join("q.jsonl");
        std::fs::write(&q, "{}\n").unwrap();
        let mut r = src.open(q.to_str().unwrap(), None).await.unwrap();
        let mut out = Vec::new();
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Data);
        std::fs::remove_file(&q).unwrap();
        assert_eq!(r.read(10, &mut out).await.unwrap(), ReadStatus::Idle);
    }

    #[tokio::test]
    async fn batch_mode_without_files_is_a_clear_error() {
        let src = FileSource::new(config("/nonexistent/dir/*.jsonl", false));
        let err = src.next_assignment().await.unwrap_err().to_string();
        assert!(err.contains("no file matches"), "{err}");
    }
}
